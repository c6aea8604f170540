"""CLIP-DINOiser refinement heads (docs/method.md, Features).

The heads are a small state dict with the published key names
``obj_proj.weight/bias`` (256x768x3x3, replicate padding) and
``bkg_decoder.weight/bias`` (1x768x1x1); they read the output of the
third-from-last block's second layer norm. Pooling averages each patch's value
feature over the patches it correlates with (correlation >= gamma).

``bkg_decoder`` reads channel-wise L2-normalised features, as in the reference
CLIP-DINOiser forward pass the published heads were trained with. Its output is
a saliency score (high = object): segmentation treats low-saliency patches as
background (docs/method.md, Tasks and explanations). ``insight train-dinoiser``
(`insight.training.dinoiser`) trains both heads through these same methods.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from insight.cache.format import file_sha256

HEAD_KEYS = ("obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias")


class DinoiserHeads(nn.Module):
    def __init__(self, width: int, proj_dim: int = 256) -> None:
        super().__init__()
        self.obj_proj = nn.Conv2d(width, proj_dim, 3, padding=1, padding_mode="replicate")
        self.bkg_decoder = nn.Conv2d(width, 1, 1)

    def similarities(self, feats_bchw: torch.Tensor) -> torch.Tensor:
        """Raw cosine similarities (B, N, N) of the projected patches (what training fits)."""
        p_bkhw = F.normalize(self.obj_proj(feats_bchw), dim=1)
        p_bnk = p_bkhw.flatten(2).transpose(1, 2)
        return p_bnk @ p_bnk.transpose(1, 2)

    def correlations(self, feats_bchw: torch.Tensor, gamma: float) -> torch.Tensor:
        """Thresholded patch correlations (B, N, N) from mid-level CLIP features."""
        corr_bnn = self.similarities(feats_bchw)
        return torch.where(corr_bnn >= gamma, corr_bnn, torch.zeros_like(corr_bnn))

    def background_logits(self, feats_bchw: torch.Tensor) -> torch.Tensor:
        """Saliency logits (B, H, W) from L2-normalised features (the published heads' input)."""
        return self.bkg_decoder(F.normalize(feats_bchw, dim=1))[:, 0]

    def background(self, feats_bchw: torch.Tensor) -> torch.Tensor:
        """Background saliency in [0, 1], (B, H, W): high = object, low = background."""
        return torch.sigmoid(self.background_logits(feats_bchw))


def pool_features(corr_bnn: torch.Tensor, feats_bnd: torch.Tensor) -> torch.Tensor:
    """f~_n = sum_m corr_nm f_m / (sum_m corr_nm + 1e-6)."""
    weights = corr_bnn / (corr_bnn.sum(-1, keepdim=True) + 1e-6)
    return weights @ feats_bnd


def load_heads(path: str | Path, width: int) -> tuple[DinoiserHeads, str]:
    """Load heads from safetensors or a plain torch state dict; returns (heads, sha256)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"backbone.dinoiser.heads: no file at {p}")
    digest = file_sha256(p)
    if p.suffix == ".safetensors":
        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise ValueError(f"DINOiser heads file {p} lacks tensors {missing}; has {sorted(state)[:8]}")
    in_ch = state["obj_proj.weight"].shape[1]
    if in_ch != width:
        raise ValueError(
            f"DINOiser heads file {p} expects {in_ch}-channel features; this backbone has {width}"
        )
    heads = DinoiserHeads(width, proj_dim=state["obj_proj.weight"].shape[0])
    heads.load_state_dict({k: state[k] for k in HEAD_KEYS})
    return heads.eval(), digest
