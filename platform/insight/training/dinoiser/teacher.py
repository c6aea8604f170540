"""The frozen teacher: a timm ViT's last-block value vectors and class-token attention.

The value vectors give the correlation targets, the class token's attention the
saliency targets, both resized to the CLIP grid (see the package docs for why).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from insight.cache.format import file_sha256
from insight.training.dinoiser.targets import correlation_targets, saliency_targets

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
