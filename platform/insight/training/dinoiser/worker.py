"""One Ray Train worker: frozen CLIP and teacher, trainable heads (DDP), evaluation, checkpoints."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insight.backbones.dinoiser import DinoiserHeads
from insight.training.dinoiser.checkpoint import HEADS_FILE, STATE_FILE, heads_bytes
from insight.training.dinoiser.clip import clip_mid_features, plain_backbone_config
from insight.training.dinoiser.images import AugmentedImages
from insight.training.dinoiser.targets import HeadsModule, head_losses
from insight.training.dinoiser.teacher import TeacherFeatures, build_teacher, teacher_targets
from insight.training.dinoiser.tracker import RankZeroTracker, progress


def _load_batch(items: list[tuple[str, str]], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = AugmentedImages(items, crop, 0.0, 0.0, 0, train=False)
    rows = [ds[i] for i in range(len(ds))]
    images = torch.from_numpy(np.stack([r["image"] for r in rows]))
    return images, torch.tensor([r["valid"] for r in rows])


class _EvalSet:
    """Fixed centre crops with cached CLIP features and teacher targets (rank 0)."""

    def __init__(self, items, cfg, backbone, teacher, device, clip_norm) -> None:
        tc = cfg.dinoiser_train
        self.chunks = []
        for i in range(0, len(items), tc.batch_size):
            images, valid = _load_batch(items[i : i + tc.batch_size], tc.crop)
            images = images.to(device)
            mid = clip_mid_features(backbone, clip_norm(images), cfg.backbone.dinoiser.block)
            with torch.no_grad(), backbone._autocast():
                tgt = teacher_targets(teacher, images, tuple(mid.shape[-2:]), tc.teacher_gamma)
            self.chunks.append((mid, *tgt, valid.to(device)))
        self.gamma, self.scale, self.bkg_weight = cfg.backbone.dinoiser.gamma, tc.corr_logit_scale, tc.bkg_weight

    @torch.no_grad()
    def __call__(self, module: HeadsModule) -> dict[str, float]:
        sums = torch.zeros(3)
        for mid, corr_t, sal_t, valid in self.chunks:
            sim, bkg = module(mid)
            lc, lb = head_losses(sim, bkg, corr_t, sal_t, valid, self.gamma, self.scale)
            n = float(valid.sum())
            sums += torch.tensor([lc.item() * n, lb.item() * n, n])
        n = max(float(sums[2]), 1.0)
        corr, bkg = float(sums[0]) / n, float(sums[1]) / n
        return {"loss": corr + self.bkg_weight * bkg, "loss_corr": corr, "loss_bkg": bkg}


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: frozen CLIP + teacher, trainable heads, DDP when world > 1."""
    import ray.train
    import ray.train.torch

    from insight.backbones.openclip import OpenCLIPBackbone
    from insight.config import InsightConfig

    cfg = InsightConfig.model_validate_json(config["cfg_json"])
    tc = cfg.dinoiser_train
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backbone = OpenCLIPBackbone(plain_backbone_config(cfg), device=device.type)
    teacher_model, _, _ = build_teacher(tc, tc.crop, mode=config["teacher_mode"])
    teacher = TeacherFeatures(teacher_model, tc.teacher).to(device)
    clip_mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    clip_std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)

    def clip_norm(images01: torch.Tensor) -> torch.Tensor:
        return (images01 - clip_mean) / clip_std

    torch.manual_seed(tc.seed)
    module = HeadsModule(DinoiserHeads(backbone.width, proj_dim=tc.proj_dim))
    model = ray.train.torch.prepare_model(module)
    inner: HeadsModule = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(
        [
            {"params": inner.heads.obj_proj.parameters(), "lr": tc.corr_lr},
            {"params": inner.heads.bkg_decoder.parameters(), "lr": tc.bkg_lr},
        ],
        weight_decay=tc.weight_decay,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(tc.lr_milestones), gamma=tc.lr_decay)

    items = [tuple(it) for it in config["items"]]
    data = AugmentedImages(items, tc.crop, tc.hflip, tc.color_jitter, tc.seed, train=True)
    sampler = torch.utils.data.DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed, drop_last=False
    )
    loader = torch.utils.data.DataLoader(data, batch_size=tc.batch_size, sampler=sampler, num_workers=tc.loader_workers)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "initial": None, "skipped": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        from safetensors.torch import load_file

        with ckpt.as_directory() as d:
            inner.heads.load_state_dict(load_file(str(Path(d) / HEADS_FILE)))
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = json.loads(saved["state_json"])
        if rank == 0:
            progress(f"train-dinoiser: resumed at epoch {state['epoch']} step {state['step']}")

    tracker = RankZeroTracker(config.get("tracking")) if rank == 0 else None
    evaluator = None
    if rank == 0:
        evaluator = _EvalSet(items[: tc.eval_images], cfg, backbone, teacher, device, clip_norm)
        if state["initial"] is None:
            state["initial"] = evaluator(inner)
        tracker.params(
            {
                "dinoiser.teacher_weights": config["teacher_weights"],
                "dinoiser.world_size": world,
                "dinoiser.images": len(items),
                "dinoiser.steps_per_epoch": len(loader),
                "dinoiser.device": str(device),
                "dinoiser.width": backbone.width,
            }
        )
        tracker.metrics({f"dinoiser.initial_{k}": v for k, v in state["initial"].items()}, step=0)

    gamma, scale = cfg.backbone.dinoiser.gamma, tc.corr_logit_scale
    skipped = set(state["skipped"])
    stop = tc.max_steps is not None and state["step"] >= tc.max_steps
    for epoch in range(state["epoch"], tc.epochs):
        if stop:
            break
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sums = torch.zeros(4, dtype=torch.float64)  # corr * n, bkg * n, valid n, images seen
        t0 = time.perf_counter()
        model.train()
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            valid = batch["valid"].to(device)
            skipped.update(items[int(i)][0] for i, ok in zip(batch["index"], batch["valid"], strict=True) if not ok)
            mid = clip_mid_features(backbone, clip_norm(images), cfg.backbone.dinoiser.block)
            with torch.no_grad(), backbone._autocast():  # the backbone's precision rule for both
                corr_t, sal_t = teacher_targets(teacher, images, tuple(mid.shape[-2:]), tc.teacher_gamma)
            sim, bkg = model(mid)
            lc, lb = head_losses(sim, bkg, corr_t, sal_t, valid, gamma, scale)
            loss = lc + tc.bkg_weight * lb
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            state["step"] += 1
            n = float(valid.sum())
            sums += torch.tensor([lc.item() * n, lb.item() * n, n, len(valid)], dtype=torch.float64)
            if rank == 0 and state["step"] % tc.log_every == 0:
                rate = float(sums[3]) * world / max(time.perf_counter() - t0, 1e-9)
                progress(
                    f"train-dinoiser: epoch {epoch + 1}/{tc.epochs} step {state['step']} loss "
                    f"{loss.item():.4f} (corr {lc.item():.4f}, bkg {lb.item():.4f}) {rate:.1f} img/s"
                )
                tracker.metrics(
                    {
                        "dinoiser.step_loss": loss.item(),
                        "dinoiser.step_loss_corr": lc.item(),
                        "dinoiser.step_loss_bkg": lb.item(),
                    },
                    step=state["step"],
                )
            if tc.max_steps is not None and state["step"] >= tc.max_steps:
                stop = True  # every rank has the same number of batches, so all stop together
                break
        if world > 1 and torch.distributed.is_initialized():
            red = sums.to(device)
            torch.distributed.all_reduce(red)
            sums = red.cpu()
            every: list[list[str]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(every, sorted(skipped))  # the union over ranks
            skipped.update(i for part in every for i in part)
        n = max(float(sums[2]), 1.0)
        epoch_corr, epoch_bkg = float(sums[0]) / n, float(sums[1]) / n
        state["epoch"] = epoch + 1
        state["skipped"] = sorted(skipped)
        last = stop or epoch + 1 == tc.epochs
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state["step"],
            "loss": epoch_corr + tc.bkg_weight * epoch_bkg,
            "loss_corr": epoch_corr,
            "loss_bkg": epoch_bkg,
            "skipped": len(skipped),
        }
        metrics.update({f"initial_{k}": v for k, v in (state["initial"] or {}).items()})
        if rank == 0:
            if last:
                state["final"] = evaluator(inner)
                metrics.update({f"final_{k}": v for k, v in state["final"].items()})
            rate = float(sums[3]) * world / max(time.perf_counter() - t0, 1e-9)
            progress(
                f"train-dinoiser: epoch {epoch + 1}/{tc.epochs} done, step {state['step']}, loss "
                f"{metrics['loss']:.4f} (corr {epoch_corr:.4f}, bkg {epoch_bkg:.4f}), {rate:.1f} img/s"
            )
            tracker.metrics(
                {f"dinoiser.{k}": v for k, v in metrics.items() if k.startswith(("loss", "final_"))}, step=epoch + 1
            )
        if last or (epoch + 1) % tc.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    meta = {
                        **config["metadata"],
                        "epochs": state["epoch"],
                        "steps": state["step"],
                        "final": state.get("final"),
                    }
                    (Path(d) / HEADS_FILE).write_bytes(heads_bytes(inner.heads, meta))
                    torch.save(
                        {
                            "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(),
                            "state_json": json.dumps(state),
                        },
                        Path(d) / STATE_FILE,
                    )
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
