"""The evaluate step: resolve labels and images, run the replicas, add up, write and log the results."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from insight.tasks.evaluate.config import choose_tasks
from insight.tasks.evaluate.labels import GroundTruth, resolve_classes, select_records
from insight.tasks.evaluate.probe import fit_probe
from insight.tasks.evaluate.replicas import VIAS, fold, run_pool
from insight.tasks.evaluate.scores import classification_scores, diagnostics, segmentation_scores

log = logging.getLogger(__name__)


def evaluate(cfg, model_ref: str | None = None, task: str = "auto", probe: bool = False) -> dict[str, Any]:
    """Evaluate ``model_ref`` (default: the registered champion) on the config's dataset: through
    concepts, opaque, and their ratio. Returns the step result (the CLI prints it as the last line).
    """
    from insight import tracking
    from insight.models import champion_ref, check_model, load_model, parse_ref

    model_ref = parse_ref(model_ref or champion_ref(cfg)).uri  # a folder as an absolute path, for the replicas
    t0 = time.perf_counter()
    check_model(model_ref, cfg.tracking.resolved_uri(cfg.workdir))  # no store made for a missing model
    uri = tracking.setup(cfg)
    with tempfile.TemporaryDirectory(prefix="insight-eval-") as tmp:
        model = load_model(model_ref, tracking_uri=uri, dst=tmp)
        return _evaluate(cfg, model, model_ref, uri, task, probe, t0)


def _evaluate(cfg, model, model_ref: str, uri: str, task: str, probe: bool, t0: float) -> dict[str, Any]:
    import mlflow

    from insight import tracking
    from insight.data.datasets import build_dataset
    from insight.models import PROBE, attach
    from insight.tasks.pictures import write_atomic

    dataset = build_dataset(cfg.data, cfg.workdir)
    seg, cls = choose_tasks(task, dataset.kind)
    records = select_records(dataset, cfg.tasks.split)
    space = resolve_classes(cfg.tasks, dataset, records)
    GroundTruth(dataset, space, cfg.tasks.label_transform)  # fails here, before any work, on a bad mapping
    if probe and not cls:
        raise ValueError("--probe needs image-level labels (classification)")
    if not model.config.backbone == cfg.backbone:
        log.info("evaluate: using the backbone the model was trained on (%s), not the config's",
                 model.config.backbone.model)
    spec = {"cfg": cfg.to_dict(), "model": model_ref,
            "tracking_uri": uri, "names": space.names, "background": space.background, "seg": seg, "cls": cls,
            "probe": probe, "pictures": cfg.tasks.pictures,
            "dataset": {"kind": dataset.kind, "root": dataset.root, "class_names": list(dataset.class_names),
                        "annotations": dataset.annotations}}
    tags = {"insight.model_run_id": model.run_id or "none", "insight.model": model_ref,
            "insight.dataset": f"{dataset.kind}:{dataset.root}"}
    with tracking.step_run(cfg, "evaluate", tags=tags) as run:
        out_dir = Path(cfg.workdir).resolve() / "evaluate" / run.info.run_id
        batches = run_pool(cfg, spec, records)
        k = len(space.names)
        conf = {v: sum((a[f"conf_{v}"] for a, _ in batches), np.zeros((k, k), np.int64)) for v in VIAS}
        skipped: dict[str, str] = {}
        explanations: dict[str, Any] = {}
        seg_images = 0
        pictures: list[str] = []
        diag: dict[str, np.ndarray] = {}
        per_image: list[dict[str, Any]] = []
        for arrays, meta in batches:
            skipped.update(meta["skipped"])
            explanations.update(meta["explanations"])
            seg_images += meta["seg_images"]
            per_image += meta.get("per_image", [])
            fold(diag, {key[5:]: arrays[key] for key in arrays if key.startswith("diag_")})
            for key in arrays:
                if key.startswith("png:"):
                    path = write_atomic(out_dir / "pictures" / key[4:], arrays[key].tobytes())
                    pictures.append(str(path))
        result: dict[str, Any] = {
            "run_id": run.info.run_id, "model": model_ref, "model_run_id": model.run_id,
            "dataset": f"{dataset.kind}:{dataset.root}", "images": len(records), "skipped": len(skipped),
            "classes": len(space.names), "background": space.background,
        }
        if skipped:
            log.warning("evaluate: skipped %d images: %s", len(skipped),
                        ", ".join(f"{i} ({w})" for i, w in list(skipped.items())[:5]))
        if seg:
            result.update(segmentation_scores(conf, space, seg_images, out_dir))
            if diag:
                result.update(diagnostics(diag, per_image, conf, out_dir))
        if cls:
            result.update(classification_scores(batches, space, out_dir))
        if probe:
            result.update(fit_probe(cfg, batches, space, out_dir, model))
            # where load_model and the server find it: the model's run (or beside its checkpoint folder)
            result["probe_run_id"] = attach(model, PROBE, out_dir / PROBE, mlflow.MlflowClient(uri), run.info.run_id)
        if explanations:
            write_atomic(out_dir / "explanations.json", json.dumps(explanations, indent=1).encode())
        write_atomic(out_dir / "skipped.json", json.dumps(skipped, indent=1).encode())
        result.update({"pictures": sorted(pictures), "out_dir": str(out_dir),
                       "seconds": round(time.perf_counter() - t0, 3)})
        write_atomic(out_dir / "results.json", json.dumps(result, indent=1).encode())
        tracking.log_result({k: v for k, v in result.items() if k not in ("images", "skipped", "classes")})
        mlflow.log_metrics({"images": len(records), "skipped_images": len(skipped)})
        mlflow.log_artifacts(str(out_dir), "evaluation")
        return result
