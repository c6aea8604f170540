"""Evaluation metrics of an SAE as plain functions of tensors (docs/method.md, Sparse autoencoder).

Usable from a notebook or the trainer alike; none of them needs the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from insight.sae.sparse import SparseCodes


def total_variance(x_bd: Tensor) -> Tensor:
    """() sum over rows of ||x - mean(x)||^2 (float64 accumulation: long streams)."""
    x = x_bd.double()
    return ((x - x.mean(0, keepdim=True)) ** 2).sum()


def fvu(x_bd: Tensor, x_hat_bd: Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x^||^2 / sum ||x - mean(x)||^2."""
    err = ((x_bd.detach().double() - x_hat_bd.detach().double()) ** 2).sum()
    return float(err / total_variance(x_bd).clamp_min(1e-30))


def fvu_per_prefix(x_bd: Tensor, recon_gbd: Tensor) -> list[float]:
    """FVU of each nested prefix reconstruction, recon_gbd (G, B, D) with b_dec included."""
    tv = total_variance(x_bd).clamp_min(1e-30)
    err_g = ((recon_gbd.double() - x_bd.double().unsqueeze(0)) ** 2).sum(dim=(1, 2))
    return (err_g / tv).tolist()


def cosine(x_bd: Tensor, x_hat_bd: Tensor) -> float:
    """Mean over rows of cos(x, x^)."""
    return float(torch.nn.functional.cosine_similarity(x_bd.double(), x_hat_bd.double(), dim=1).mean())


def l0(z: Tensor | SparseCodes) -> float:
    """Mean number of non-zero codes per row."""
    if isinstance(z, SparseCodes):
        return z.l0()
    return float((z != 0).sum()) / max(1, z.shape[0])


def dead_fraction_per_group(dead_m: Tensor, group_sizes: Sequence[int]) -> list[float]:
    """Share of dead concepts in each group; ``dead_m`` is a (M,) bool mask."""
    out, start = [], 0
    for size in group_sizes:
        out.append(float(dead_m[start : start + size].float().mean()))
        start += size
    return out


def group_l0(z: Tensor | SparseCodes, group_sizes: Sequence[int]) -> list[float]:
    """Mean active codes per row inside each group (where the sparsity budget goes)."""
    ends = torch.tensor(list(group_sizes)).cumsum(0)
    if isinstance(z, SparseCodes):
        live = z.values.detach() > 0
        grp = torch.bucketize(z.concept_idx[live].cpu(), ends, right=True)
        counts = torch.bincount(grp, minlength=len(group_sizes)).double()
        return (counts / max(1, z.batch_size)).tolist()
    out, start = [], 0
    for end in ends.tolist():
        out.append(float((z[:, start:end] != 0).sum()) / max(1, z.shape[0]))
        start = end
    return out
