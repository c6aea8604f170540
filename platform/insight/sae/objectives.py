"""The Matryoshka BatchTopK objective, separate from the model.

loss = mean_g w_g * mean_b ||x_b - (b_dec + sum_{g' <= g} z_g' W_dec,g')||^2
       + alpha * AuxK

Group weights (``sae.group_weights``): the reference trainer
(dictionary_learning's ``MatryoshkaBatchTopKTrainer``, which the paper's code
runs with its defaults) multiplies each prefix loss by w_g = 1/G and then
takes the mean over groups, so its reconstruction term is (1/G) * mean_g MSE_g.
That is the default here ("reference"). "equal" (w_g = 1, the plain mean over
prefixes) makes the reconstruction G times stronger against alpha * AuxK and
G times more likely to be cut by gradient clipping; with Adam a common scale
changes nothing else. Depth 1 is the plain BatchTopK MSE under both.

All prefixes come from ONE decode: the decoder returns per-group partial sums
c_g (G, B, D) and the prefix residuals are built incrementally,
e_0 = x - b_dec - c_0, e_g = e_{g-1} - c_g, by a small autograd function that
keeps no (G, B, D) temporaries besides e (its backward is a reverse running
sum).

AuxK: the top ``aux_k`` (default D/2) ReLU'd pre-activations of each row among
*dead* concepts decode (without b_dec) the detached residual x - x^; its
squared error is divided by the residual's variance (sum over D of the
per-dimension variance over the batch), as in the BatchTopK paper.

Dead = no firing in the last ``dead_tokens`` tokens. The per-concept counter
is updated by :func:`update_dead_counter` from the fired counts of a batch and
its token count, so a distributed trainer can all-reduce both first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from insight.sae.model import MatryoshkaSAE
from insight.sae.sparse import DecodeMode, SparseCodes


class _PrefixSSE(torch.autograd.Function):
    """Sum of squared residuals of every prefix, from per-group partial sums.

    Input r_bd = x - b_dec and c_gbd; output (G,) with sse_g = ||r - sum_{g'<=g} c_g'||^2.
    """

    @staticmethod
    def forward(ctx, r_bd: Tensor, c_gbd: Tensor) -> Tensor:  # type: ignore[override]
        e_gbd = torch.empty_like(c_gbd)
        torch.sub(r_bd, c_gbd[0], out=e_gbd[0])
        for g in range(1, c_gbd.shape[0]):
            torch.sub(e_gbd[g - 1], c_gbd[g], out=e_gbd[g])
        flat_gn = e_gbd.view(e_gbd.shape[0], -1)
        sse_g = torch.stack([torch.dot(row, row) for row in flat_gn])  # BLAS dots: no (G, B*D) temporary
        ctx.save_for_backward(e_gbd)
        return sse_g

    @staticmethod
    def backward(ctx, grad_g: Tensor):  # type: ignore[override]
        (e_gbd,) = ctx.saved_tensors
        coef = (2.0 * grad_g).tolist()
        n_groups = e_gbd.shape[0]
        # d sse_g / d c_g' = -2 e_g for every g >= g': a reverse running sum
        gc_gbd = torch.empty_like(e_gbd)
        torch.mul(e_gbd[-1], -coef[-1], out=gc_gbd[-1])
        for g in range(n_groups - 2, -1, -1):
            torch.add(gc_gbd[g + 1], e_gbd[g], alpha=-coef[g], out=gc_gbd[g])
        grad_r = gc_gbd[0].neg() if ctx.needs_input_grad[0] else None
        return grad_r, gc_gbd


def prefix_sse(r_bd: Tensor, c_gbd: Tensor) -> Tensor:
    """(G,) squared error of each nested prefix; see :class:`_PrefixSSE`."""
    return _PrefixSSE.apply(r_bd, c_gbd)


GroupWeights = Literal["reference", "equal"] | Sequence[float]


def resolve_group_weights(spec: GroupWeights | None, n_groups: int) -> list[float]:
    """The per-group weights w_g of ``sae.group_weights`` ("reference": 1/G, "equal": 1, or a list)."""
    if spec is None or spec == "reference":
        return [1.0 / n_groups] * n_groups
    if spec == "equal":
        return [1.0] * n_groups
    if isinstance(spec, str):
        raise ValueError(f"unknown group weighting {spec!r}: 'reference', 'equal' or one weight per group")
    weights = [float(w) for w in spec]
    if len(weights) != n_groups:
        raise ValueError(f"{len(weights)} group weights for {n_groups} groups")
    return weights


@dataclass(frozen=True)
class MatryoshkaLoss:
    """Result of the objective: ``loss`` to backpropagate, detached parts for logging."""

    loss: Tensor
    prefix_mse: Tensor  # (G,) mean over rows of ||x - x^_prefix||^2, detached
    aux_loss: Tensor  # () normalised AuxK loss, detached (0 when nothing is dead)
    n_dead: int
    total_variance: Tensor  # () mean over rows of ||x - mean(x)||^2, detached

    @property
    def fvu(self) -> Tensor:
        """FVU of the full dictionary (last prefix)."""
        return self.prefix_mse[-1] / self.total_variance.clamp_min(1e-12)

    def metrics(self) -> dict[str, float]:
        out = {
            "loss": float(self.loss.detach()),
            "mse": float(self.prefix_mse[-1]),
            "fvu": float(self.fvu),
            "aux_loss": float(self.aux_loss),
            "n_dead": float(self.n_dead),
        }
        fvu_g = (self.prefix_mse / self.total_variance.clamp_min(1e-12)).tolist()
        for g, v in enumerate(fvu_g):
            out[f"fvu_prefix_{g}"] = v
        return out


def update_dead_counter(tokens_since_fired_m: Tensor, fired_m: Tensor, n_tokens: int | Tensor) -> Tensor:
    """Advance the per-concept "tokens since last fired" counter in place.

    ``fired_m`` counts how often each concept fired in the batch (summed over
    workers if distributed) and ``n_tokens`` the batch's tokens (likewise).
    A concept that fired anywhere in the batch restarts from 0.
    """
    tokens_since_fired_m.add_(n_tokens)
    tokens_since_fired_m.masked_fill_(fired_m > 0, 0)
    return tokens_since_fired_m


def dead_mask(tokens_since_fired_m: Tensor, dead_tokens: int) -> Tensor:
    """(M,) bool: concepts that have not fired in the last ``dead_tokens`` tokens."""
    return tokens_since_fired_m >= dead_tokens


def aux_k_loss(
    model: MatryoshkaSAE, x_bd: Tensor, residual_bd: Tensor, pre_bm: Tensor, dead_m: Tensor, k_aux: int | None = None
) -> Tensor | None:
    """Normalised AuxK loss, or None when no concept is dead."""
    aux = model.aux_codes(x_bd, pre_bm, dead_m, k_aux)
    if aux is None:
        return None
    recon_bd = model.decode_unbiased(aux)
    err = residual_bd - recon_bd
    l2 = torch.linalg.vecdot(err, err).mean()
    centred = residual_bd - residual_bd.mean(0, keepdim=True)
    denom = torch.linalg.vecdot(centred, centred).mean()
    return torch.nan_to_num(l2 / denom, nan=0.0, posinf=0.0)


def matryoshka_loss(
    model: MatryoshkaSAE,
    x_bd: Tensor,
    codes: SparseCodes,
    dead_m: Tensor | None = None,
    *,
    group_weights: GroupWeights | None = "reference",
    aux_alpha: float = 1 / 32,
    aux_k: int | None = None,
    decode_mode: DecodeMode = "auto",
) -> MatryoshkaLoss:
    """The Matryoshka reconstruction loss of ``codes`` plus alpha * AuxK over ``dead_m``.

    ``group_weights``: see :func:`resolve_group_weights` (None means "reference").
    """
    n_groups = model.n_groups
    batch = x_bd.shape[0]
    weights = torch.tensor(resolve_group_weights(group_weights, n_groups), dtype=x_bd.dtype, device=x_bd.device)

    c_gbd = model.decode_groups(codes, decode_mode)
    r_bd = x_bd - model.b_dec
    sse_g = prefix_sse(r_bd, c_gbd)
    mse_g = sse_g / batch
    loss = (weights * mse_g).mean()

    with torch.no_grad():
        centred = (x_bd - x_bd.mean(0, keepdim=True)).reshape(-1)
        total_var = torch.dot(centred, centred) / batch

    aux = x_bd.new_zeros(())
    n_dead = 0
    if dead_m is not None and aux_alpha > 0:
        n_dead = int(dead_m.sum())
        if n_dead > 0:
            if codes.pre_bm is None:
                raise ValueError("AuxK needs codes.pre_bm: encode with keep_pre_acts=True")
            with torch.no_grad():
                residual_bd = x_bd - (c_gbd.sum(0) + model.b_dec)
            aux_t = aux_k_loss(model, x_bd, residual_bd, codes.pre_bm, dead_m, aux_k)
            if aux_t is not None:
                loss = loss + aux_alpha * aux_t
                aux = aux_t.detach()
    return MatryoshkaLoss(
        loss=loss,
        prefix_mse=mse_g.detach(),
        aux_loss=aux,
        n_dead=n_dead,
        total_variance=total_var,
    )
