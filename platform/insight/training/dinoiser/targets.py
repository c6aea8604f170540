"""What the heads are trained against, and the loss that scores them (see the package docs).

The correlation head is scored by BCE on its cosine similarities shifted by gamma, the
background head by BCE on its logits; both against binarised teacher signals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from insight.backbones.dinoiser import DinoiserHeads


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
