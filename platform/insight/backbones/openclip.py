"""open_clip backbone with the MaskCLIP value path (docs/method.md, Features).

Plain CLIP patch tokens localise poorly. The value path runs the last block
without attention mixing (value + out projection + residual, then the MLP with
its residual), applies the final layer norm and the visual projection to every
patch, which puts each patch in the joint text-image space. Skipping that
block's attention also makes it slightly cheaper than ``encode_image``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from insight.backbones.base import finish_patches, patch_identity
from insight.backbones.dinoiser import DinoiserHeads, load_heads, pool_features
from insight.cache.format import file_sha256

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def register_architecture(name: str, architecture: dict[str, Any]) -> None:
    """Register an open_clip model config under ``name`` (tiny models for tests)."""
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="insight-openclip-"))
    (folder / f"{name}.json").write_text(json.dumps(architecture))
    open_clip.add_model_config(folder)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backbone.device is 'cuda' but no CUDA device is visible")
    return device


class OpenCLIPBackbone(nn.Module):
    """Dense patch features from any open_clip ViT, plus its text tower."""

    def __init__(self, cfg, device: str | None = None) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        self.device_name = resolve_device(device or cfg.device)
        if cfg.architecture is not None:
            register_architecture(cfg.model, cfg.architecture)
        pretrained = cfg.pretrained
        if isinstance(pretrained, str) and pretrained.lower() in ("", "none", "null", "random"):
            pretrained = None
        self._weights_id: str
        if pretrained is None:
            self._weights_id = f"random-init:seed={cfg.seed}"
        elif os.path.isfile(pretrained):
            self._weights_id = f"file:sha256={file_sha256(pretrained)}"
        else:
            self._weights_id = f"tag:{pretrained}"
        rng = torch.random.fork_rng(devices=[]) if pretrained is None else contextlib.nullcontext()
        try:
            with rng:
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(
                    cfg.model,
                    pretrained=pretrained,
                    force_image_size=cfg.image_size,
                    pretrained_text=False,
                    pretrained_image=False,
                )
        except RuntimeError as exc:
            raise RuntimeError(
                f"backbone: cannot build open_clip model {cfg.model!r} with pretrained="
                f"{pretrained!r}: {exc}"
            ) from exc
        self.model = model.eval().requires_grad_(False).to(self.device_name)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        visual = self.model.visual
        blocks = visual.transformer.resblocks
        last = blocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise ValueError(
                f"backbone {cfg.model!r}: the value path needs blocks with nn.MultiheadAttention"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"backbone {cfg.model!r}: attentional pooling is not supported")
        self.patch_size = int(visual.patch_size[0])
        self.image_size = int(cfg.image_size)
        self.width = int(visual.conv1.out_channels)
        self.dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", OPENAI_MEAN))
        self.std = tuple(pp.get("std", OPENAI_STD))
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.heads: DinoiserHeads | None = None
        self._heads_id: str | None = None
        if cfg.dinoiser.heads:
            if len(blocks) < -cfg.dinoiser.block + 1:
                raise ValueError(
                    f"backbone.dinoiser.block={cfg.dinoiser.block} needs more blocks than {len(blocks)}"
                )
            heads, digest = load_heads(cfg.dinoiser.heads, self.width)
            self.heads = heads.to(self.device_name)
            self._heads_id = digest
        self.last_background: torch.Tensor | None = None

    # ------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        import open_clip

        return patch_identity({
            "kind": "openclip",
            "open_clip": open_clip.__version__,
            "model": self.cfg.model,
            "architecture": self.cfg.architecture,
            "weights": self._weights_id,
            "image_size": self.image_size,
            "path": "maskclip-value",
            "dinoiser": None
            if self._heads_id is None
            else {"heads_sha256": self._heads_id, "gamma": self.cfg.dinoiser.gamma, "block": self.cfg.dinoiser.block},
            "dim": self.dim,
        }, self.cfg.patch_norm)

    # ------------------------------------------------------------ helpers
    def _autocast(self):
        prec = self.cfg.precision
        if self.device_name != "cuda" or prec == "fp32" or (prec == "auto" and self.device_name != "cuda"):
            return contextlib.nullcontext()
        dtype = torch.float16 if prec == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        key = (gh, gw)
        if key not in self._pos_cache:
            visual = self.model.visual
            pos = visual.positional_embedding
            g0h, g0w = visual.grid_size
            if (gh, gw) == (g0h, g0w):
                self._pos_cache[key] = pos
            else:
                cls, grid = pos[:1], pos[1:]
                grid = grid.reshape(1, g0h, g0w, -1).permute(0, 3, 1, 2)
                grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
                grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
                self._pos_cache[key] = torch.cat([cls, grid])
        return self._pos_cache[key]

    def _embed(self, images_bchw: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        visual = self.model.visual
        x = visual.conv1(images_bchw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype)
        return visual.ln_pre(x), gh, gw

    @staticmethod
    def value_path(block: nn.Module, x_bnc: torch.Tensor) -> torch.Tensor:
        """Last block without attention mixing: v-proj + out-proj + residual, then MLP."""
        attn: nn.MultiheadAttention = block.attn
        width = x_bnc.shape[-1]
        w_v = attn.in_proj_weight[2 * width :]
        b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        v = F.linear(block.ln_1(x_bnc), w_v, b_v)
        x_bnc = x_bnc + block.ls_1(attn.out_proj(v))
        return x_bnc + block.ls_2(block.mlp(block.ln_2(x_bnc)))

    # ------------------------------------------------------------ encoders
    @torch.inference_mode()
    def encode_patches(self, images_bchw: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        mid_idx = len(blocks) + self.cfg.dinoiser.block if self.heads is not None else -1
        images_bchw = images_bchw.to(self.device_name, non_blocking=True)
        with self._autocast():
            x, gh, gw = self._embed(images_bchw)
            if not batch_first:
                x = x.transpose(0, 1)
            mid = None
            for i, blk in enumerate(blocks[:-1]):
                if i == mid_idx:
                    xt = x if batch_first else x.transpose(0, 1)
                    xt = xt + blk.ls_1(blk.attention(blk.ln_1(xt)))
                    mid = blk.ln_2(xt)
                    xt = xt + blk.ls_2(blk.mlp(mid))
                    x = xt if batch_first else xt.transpose(0, 1)
                else:
                    x = blk(x)
            if not batch_first:
                x = x.transpose(0, 1)
            x = self.value_path(blocks[-1], x)
            x = visual.ln_post(x)[:, 1:]
            if visual.proj is not None:
                x = x @ visual.proj
            feats_bnd = x.float()
            if self.heads is not None and mid is not None:
                mid_bchw = mid[:, 1:].float().transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
                corr = self.heads.float().correlations(mid_bchw, self.cfg.dinoiser.gamma)
                feats_bnd = pool_features(corr, feats_bnd)
                self.last_background = self.heads.background(mid_bchw).cpu()
        return finish_patches(feats_bnd.reshape(x.shape[0], gh, gw, -1), self.cfg.patch_norm).cpu()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device_name)
        with self._autocast():
            out = self.model.encode_text(tokens)
        return F.normalize(out.float(), dim=-1).cpu()
