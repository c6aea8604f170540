"""`insight train-dinoiser`: train the CLIP-DINOiser refinement heads with Ray Train.

What is learned (docs/method.md, Features). CLIP stays frozen. Both heads read the
output of the second layer norm of block ``backbone.dinoiser.block`` (the
third-from-last by default) on a ``dinoiser_train.crop`` crop:

- Correlation head (3x3 conv, replicate padding -> ``proj_dim``). Target: the
  teacher's binarised patch correlations. The teacher is a frozen timm ViT
  (DINO ViT-B/16 by default); its features are the *value* vectors of its last
  block (what CLIP-DINOiser uses), resized to the CLIP grid when the patch
  sizes differ, L2-normalised; target_nm = 1[cos(v_n, v_m) >= teacher_gamma].
  Prediction: the cosine s_nm of the head's L2-normalised outputs, scored by
  BCE with logit (s_nm - gamma) * corr_logit_scale, gamma being
  ``backbone.dinoiser.gamma``. Why not the reference's logit: CLIP-DINOiser's
  code feeds the clamped cosine itself to BCE-with-logits, so its
  probabilities live in [0.5, 0.73] and the loss can never approach zero;
  shifting by gamma puts the BCE decision boundary exactly at the threshold
  extraction applies, and the scale lets the loss saturate.
- Background head (1x1 conv -> 1, on L2-normalised features). Target: the
  teacher's last-block attention of the class token to the patches (mean over
  heads), binarised at its per-image mean: 1 = salient (object), 0 =
  background. Why this one: the reference distils FOUND, which needs its own
  trained decoder (not available offline) and whose starting point is this
  very signal (DINO's class token attends to objects; FOUND takes the
  least-attended patch as its background seed). The class-token attention
  comes out of the teacher forward we run anyway, needs no extra weights, and
  binarising at the mean has no parameter to tune. It is coarser than FOUND
  on cluttered scenes: prefer a stronger saliency model when one is at hand.

Data: any dataset of the data layer; each step takes ``batch_size`` images per
worker, albumentations shortest-side resize + random crop, flips and colour
jitter, seeded by (seed, epoch, image) so a rerun sees the same pixels.
Unreadable images are masked out of the loss (every rank still steps, so DDP
stays in step) and counted. ``eval_images`` fixed centre crops are scored
before and after training (rank 0): ``initial_loss`` and ``final_loss``
compare the same pixels and targets, free of augmentation noise.

Distribution and outputs: a Ray Train ``TorchTrainer`` (DDP over
``num_workers``); rank 0 prints a progress line, logs its params and the loss
curve to the step's MLflow run, and reports a checkpoint (heads safetensors +
optimiser state) every ``checkpoint_every`` epochs and at the end, from which a
failed worker group resumes. The driver writes the final heads atomically to
``dinoiser_train.out`` in the published key layout (``obj_proj.*``,
``bkg_decoder.*``); ``backbone.dinoiser.heads=<that file>`` then refines
extracted features and changes the cache key (the backbone identity carries
the heads' sha256).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from insight.backbones.dinoiser import HEAD_KEYS, DinoiserHeads
from insight.cache.format import file_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS_FILE = "heads.safetensors"
STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------- targets and losses


def correlation_targets(teacher_bnc: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binarised teacher correlations (B, N, N): 1 where cos(t_n, t_m) >= gamma and > 0."""
    t_bnc = F.normalize(teacher_bnc.float(), dim=-1)
    corr_bnn = t_bnc @ t_bnc.transpose(1, 2)
    return ((corr_bnn >= gamma) & (corr_bnn > 0)).float()


def saliency_targets(cls_attn_bn: torch.Tensor) -> torch.Tensor:
    """1 for patches the class token attends to more than its per-image mean (objects)."""
    cls_attn_bn = cls_attn_bn.float()
    return (cls_attn_bn > cls_attn_bn.mean(-1, keepdim=True)).float()


def head_losses(
    sim_bnn: torch.Tensor,
    bkg_logits_bn: torch.Tensor,
    corr_target_bnn: torch.Tensor,
    sal_target_bn: torch.Tensor,
    valid_b: torch.Tensor,
    gamma: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean BCE of both heads over the valid images: (correlation loss, background loss)."""
    corr_logits = (sim_bnn - gamma) * scale
    lc_b = F.binary_cross_entropy_with_logits(corr_logits, corr_target_bnn, reduction="none").mean((1, 2))
    lb_b = F.binary_cross_entropy_with_logits(bkg_logits_bn, sal_target_bn, reduction="none").mean(1)
    w_b = valid_b.float()
    denom = w_b.sum().clamp(min=1.0)
    return (lc_b * w_b).sum() / denom, (lb_b * w_b).sum() / denom


class HeadsModule(nn.Module):
    """The trainable part, with a forward so DDP sees every use of the parameters."""

    def __init__(self, heads: DinoiserHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, mid_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads.similarities(mid_bchw), self.heads.background_logits(mid_bchw).flatten(1)


# ---------------------------------------------------------------- frozen feature sources


def plain_backbone_config(cfg):
    """The configured backbone without heads: training must see raw CLIP features."""
    dn = cfg.backbone.dinoiser.model_copy(update={"heads": None})
    return cfg.backbone.model_copy(update={"dinoiser": dn})


def clip_mid_features(backbone, images_bchw: torch.Tensor, block: int) -> torch.Tensor:
    """Output of block ``block``'s second layer norm, patches only: (B, width, H, W).

    Mirrors the mid-feature branch of `OpenCLIPBackbone.encode_patches` (a test
    checks they agree) but stops there, since training needs nothing later.
    """
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    idx = len(blocks) + block
    if not 0 <= idx < len(blocks) - 1:
        raise ValueError(f"backbone.dinoiser.block={block} is out of range for {len(blocks)} blocks")
    batch_first = getattr(visual.transformer, "batch_first", True)
    with torch.no_grad(), backbone._autocast():
        x, gh, gw = backbone._embed(images_bchw.to(backbone.device_name))
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:idx]:
            x = blk(x)
        xt = x if batch_first else x.transpose(0, 1)
        blk = blocks[idx]
        xt = xt + blk.ls_1(blk.attention(blk.ln_1(xt)))
        mid = blk.ln_2(xt)
    return mid[:, 1:].float().transpose(1, 2).reshape(images_bchw.shape[0], -1, gh, gw)


def build_teacher(tc, crop: int, mode: str | None = None) -> tuple[nn.Module, str, str]:
    """Create the timm teacher: (model, weights id, resolved mode).

    ``mode`` (default ``tc.teacher_weights``): ``auto`` tries timm's pretrained
    weights from the local cache and falls back to a seeded random init with one
    warning; ``pretrained`` insists on them; ``random``; or a local file. The
    driver resolves ``auto`` once and hands the result to every worker, so all
    ranks distil the same teacher.
    """
    import timm

    mode = mode or tc.teacher_weights
    kwargs: dict[str, Any] = {"img_size": crop, "num_classes": 0, **tc.teacher_kwargs}

    def create(pretrained: bool, **extra: Any) -> nn.Module:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tc.seed)
                return timm.create_model(tc.teacher, pretrained=pretrained, **kwargs, **extra)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"dinoiser_train.teacher={tc.teacher!r} is not a timm model: {exc}") from None
            raise ValueError(
                f"dinoiser_train.teacher={tc.teacher!r} (teacher_kwargs={tc.teacher_kwargs}) cannot load"
                f" its weights ({mode}): {str(exc)[:400]}"
            ) from None
        except TypeError as exc:
            raise ValueError(f"dinoiser_train.teacher_kwargs={tc.teacher_kwargs}: {exc}") from None

    if mode == "random":
        return create(False), f"random-init:seed={tc.seed}", "random"
    if mode in ("auto", "pretrained"):
        try:
            return create(True), f"timm-pretrained:{tc.teacher}", "pretrained"
        except OSError as exc:  # not in the local cache and no network (HF_HUB_OFFLINE=1)
            if mode == "pretrained":
                raise FileNotFoundError(
                    f"dinoiser_train.teacher={tc.teacher!r}: pretrained weights are not available: {exc}"
                ) from None
            log.warning(
                "train-dinoiser: NO PRETRAINED WEIGHTS for teacher %r available locally (%s); using a "
                "RANDOM-INIT teacher (seed %d): the heads will learn a random ViT's correlations. Put the "
                "weights in the Hugging Face cache or set dinoiser_train.teacher_weights=<file>.",
                tc.teacher,
                type(exc).__name__,
                tc.seed,
            )
            return create(False), f"random-init:seed={tc.seed}", "random"
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"dinoiser_train.teacher_weights: no file at {path} (or use auto/random)")
    model = create(True, pretrained_cfg_overlay={"file": str(path.resolve())})
    return model, f"file:sha256={file_sha256(path)}", str(path.resolve())


class _StopForward(Exception):
    """Raised by a hook once the last block's input is captured: the rest is not needed."""


class TeacherFeatures(nn.Module):
    """A frozen timm ViT: its last block's value vectors and class-token attention."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
        if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
            raise ValueError(f"dinoiser_train.teacher={name!r}: need a timm ViT with standard attention blocks")
        if getattr(model, "cls_token", None) is None:
            raise ValueError(f"dinoiser_train.teacher={name!r} has no class token (the saliency target needs one)")
        self.model = model.eval().requires_grad_(False)
        pc = getattr(model, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(pc.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pc.get("std", IMAGENET_STD)).view(1, 3, 1, 1))
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.prefix = int(model.num_prefix_tokens)

    @torch.no_grad()
    def forward(self, images01_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (values (B, C, h, w), class-token attention (B, h, w))."""
        x = (images01_bchw - self.mean) / self.std
        last = self.model.blocks[-1]
        captured: dict[str, torch.Tensor] = {}

        def grab(_mod: nn.Module, args: tuple) -> None:
            captured["x"] = args[0]
            raise _StopForward

        hook = last.register_forward_pre_hook(grab)
        try:
            self.model.forward_features(x)
        except _StopForward:
            pass
        finally:
            hook.remove()
        h = last.norm1(captured["x"])
        attn = last.attn
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        a_bhnn = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if n - self.prefix != gh * gw:
            raise ValueError(f"teacher gave {n - self.prefix} patch tokens for a {gh}x{gw} grid")
        cls_bhw = a_bhnn[:, :, 0, self.prefix :].mean(1).reshape(b, gh, gw)
        v_bnc = v[:, :, self.prefix :].transpose(1, 2).reshape(b, gh * gw, -1).float()
        return v_bnc.transpose(1, 2).reshape(b, -1, gh, gw), cls_bhw


def teacher_targets(
    teacher: TeacherFeatures, images01_bchw: torch.Tensor, grid: tuple[int, int], gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correlation targets (B, N, N), saliency targets (B, N)) on the CLIP grid."""
    values_bchw, cls_bhw = teacher(images01_bchw)
    with torch.autocast(values_bchw.device.type, enabled=False):  # thresholds want fp32 cosines
        values_bchw, cls_bhw = values_bchw.float(), cls_bhw.float()
        if tuple(values_bchw.shape[-2:]) != tuple(grid):
            values_bchw = F.interpolate(values_bchw, size=grid, mode="bilinear", align_corners=False)
            cls_bhw = F.interpolate(cls_bhw[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
        corr_bnn = correlation_targets(values_bchw.flatten(2).transpose(1, 2), gamma)
        return corr_bnn, saliency_targets(cls_bhw.flatten(1))


# ---------------------------------------------------------------- data


class AugmentedImages(torch.utils.data.Dataset):
    """(image id, path) items -> crops in [0, 1] (3, S, S); unreadable images come back masked."""

    def __init__(
        self, items: list[tuple[str, str]], crop: int, hflip: float, color_jitter: float, seed: int, train: bool = True
    ) -> None:
        import albumentations as A
        import cv2

        self.items, self.crop, self.seed, self.train, self.epoch = items, crop, seed, train, 0
        resize = A.SmallestMaxSize(max_size=crop, interpolation=cv2.INTER_CUBIC)
        if train:
            cj = color_jitter
            self.transform = A.Compose(
                [
                    resize,
                    A.RandomCrop(crop, crop),
                    A.HorizontalFlip(p=hflip),
                    A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=min(0.5, cj / 4), p=0.8),
                ]
            )
        else:
            self.transform = A.Compose([resize, A.CenterCrop(crop, crop)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from insight.data.datasets import load_image

        image_id, path = self.items[i]
        rgb, _why = load_image(path)
        if rgb is None:
            return {"image": np.zeros((3, self.crop, self.crop), np.float32), "valid": False, "index": i}
        if self.train:
            self.transform.set_random_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{image_id}".encode()))
        out = self.transform(image=rgb)["image"]
        chw = np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / 255.0
        return {"image": chw, "valid": True, "index": i}


# ---------------------------------------------------------------- checkpoints


def heads_state(heads: DinoiserHeads) -> dict[str, torch.Tensor]:
    """The published key layout, contiguous CPU tensors."""
    sd = heads.state_dict()
    return {k: sd[k].detach().cpu().contiguous() for k in HEAD_KEYS}


def heads_bytes(heads: DinoiserHeads, metadata: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    meta = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return save(heads_state(heads), metadata=meta)


from insight.atomic import write_atomic  # noqa: E402,F401


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run (no MLflow callback in Train v2)."""

    def __init__(self, tracking: dict[str, str] | None) -> None:
        self.client = None
        if tracking:
            import mlflow
            from mlflow import MlflowClient

            mlflow.set_tracking_uri(tracking["uri"])
            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def params(self, params: dict[str, Any]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


# ---------------------------------------------------------------- the worker loop


def progress(line: str) -> None:
    """A progress line on the process's real stderr (Ray forwards it to the driver once).

    Train v2 patches ``print`` to tee stdout/stderr into its logger, which shows
    every line twice; writing to ``sys.__stderr__`` bypasses that.
    """
    print(line, file=sys.__stderr__, flush=True)


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


def _train_worker(config: dict[str, Any]) -> None:
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

    tracker = _RankZeroTracker(config.get("tracking")) if rank == 0 else None
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


# ---------------------------------------------------------------- the driver


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
        _train_worker,
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
