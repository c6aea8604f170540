"""`insight train-dinoiser` on the driver: check the config, start Ray Train, write the heads."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from insight.atomic import write_atomic
from insight.training.dinoiser.checkpoint import HEADS_FILE
from insight.training.dinoiser.clip import plain_backbone_config
from insight.training.dinoiser.teacher import TeacherFeatures, build_teacher
from insight.training.dinoiser.worker import train_worker

log = logging.getLogger(__name__)


def train_dinoiser(cfg, tracking: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the heads on ``cfg`` with Ray Train; write them to ``dinoiser_train.out``.

    ``tracking`` ({"uri", "run_id"}) lets rank 0 log into the caller's MLflow run.
    Returns the step result (heads file, losses before/after, counts).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from insight.backbones.dinoiser import load_heads
    from insight.backbones.openclip import OpenCLIPBackbone
    from insight.data.datasets import build_dataset
    from insight.runtime import ensure_ray

    t_start = time.perf_counter()
    tc = cfg.dinoiser_train
    dataset = build_dataset(cfg.data, cfg.workdir)
    items = [(r.image_id, r.path) for r in dataset.records]
    # Build both frozen models once here: config errors surface before Ray starts.
    backbone = OpenCLIPBackbone(plain_backbone_config(cfg), device="cpu")
    n_blocks = len(backbone.model.visual.transformer.resblocks)
    if not 0 <= n_blocks + cfg.backbone.dinoiser.block < n_blocks - 1:
        raise ValueError(
            f"backbone.dinoiser.block={cfg.backbone.dinoiser.block} is out of range for a {n_blocks}-block backbone"
        )
    if tc.crop % backbone.patch_size:
        raise ValueError(
            f"dinoiser_train.crop={tc.crop} is not a multiple of the backbone's patch size {backbone.patch_size}"
        )
    model, teacher_weights, teacher_mode = build_teacher(tc, tc.crop)
    teacher = TeacherFeatures(model, tc.teacher)
    if tc.crop % teacher.patch_size:
        raise ValueError(
            f"dinoiser_train.crop={tc.crop} is not a multiple of the teacher's patch size {teacher.patch_size}"
        )
    grid = tc.crop // backbone.patch_size
    del model, teacher
    metadata = {
        "insight.kind": "dinoiser-heads",
        "backbone": backbone.identity(),
        "teacher": tc.teacher,
        "teacher_kwargs": tc.teacher_kwargs,
        "teacher_weights": teacher_weights,
        "gamma": cfg.backbone.dinoiser.gamma,
        "block": cfg.backbone.dinoiser.block,
        "teacher_gamma": tc.teacher_gamma,
        "crop": tc.crop,
        "dataset": dataset.identity(),
    }
    width = backbone.width
    del backbone
    log.info(
        "train-dinoiser: %d images, crop %d (%dx%d grid), teacher %s (%s), %d worker(s)",
        len(items),
        tc.crop,
        grid,
        grid,
        tc.teacher,
        teacher_weights,
        tc.num_workers,
    )

    ensure_ray(cfg)
    storage = Path(cfg.workdir).resolve() / "ray_train"
    name = f"{cfg.name}-dinoiser-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg_json": cfg.model_dump_json(by_alias=True),
            "items": items,
            "teacher_mode": teacher_mode,
            "teacher_weights": teacher_weights,
            "tracking": tracking,
            "metadata": metadata,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None or result.metrics is None:
        raise RuntimeError(f"train-dinoiser: run {name} finished without a final checkpoint ({result.error})")
    metrics = result.metrics
    out = Path(cfg.path(tc.out)).resolve()
    with result.checkpoint.as_directory() as d:
        write_atomic(out, (Path(d) / HEADS_FILE).read_bytes())
    _, digest = load_heads(out, width)  # the file must load the way extraction loads it
    final = {k: metrics[k] for k in metrics if k.startswith(("final_", "initial_"))}
    return {
        "heads": str(out),
        "heads_sha256": digest,
        **final,
        "train_loss": metrics["loss"],
        "epochs": metrics["epoch"],
        "steps": metrics["step"],
        "images": len(items),
        "skipped": metrics["skipped"],
        "grid": [grid, grid],
        "teacher": tc.teacher,
        "teacher_weights": teacher_weights,
        "workers": tc.num_workers,
        "checkpoint": result.checkpoint.path,
        "seconds": time.perf_counter() - t_start,
        "use": f"--set backbone.dinoiser.heads={out}",
    }
