"""Sparse codes and the decoder that exploits them.

BatchTopK keeps k*B of B*M activations (k=12, M=8192: 0.15 %), so decoding by
gathering the active decoder rows costs n*D instead of the B*M*D of a dense
matmul. Both directions of the gather decode are built from
``embedding_bag`` (a fused gather + weighted sum, parallel on CPU, one kernel
on GPU) and the backward is written by hand so no B*M or n*D temporary exists:

* forward: bag (g, b) = sum over the active concepts of row b in group g of
  value * W_dec[m] -> per-group partial reconstructions (G, B, D);
* grad of W_dec: the same embedding_bag with roles swapped (bags = concepts,
  rows of grad_out weighted by the values);
* grad of the values: <W_dec[m], grad_out[bag]> for each active entry, an SDDMM
  done by ``torch.sparse.sampled_addmm`` on the CSR layout of the codes.

Measured on this repository's CPU machine (2-core Xeon with AVX-512, torch
2.14.1, fp32, one intra-op thread, CPU time, best of 3, while other jobs
shared the machine), group decode forward + backward for D=512, M=8192,
6 reference groups, B=1024, as a function of k (density k/M):

    k      density   sparse (ms)   dense (ms)
    12     0.15 %        17.9         317.3
    128    1.6 %         47.9         334.8
    512    6.3 %        149.5         363.2
    768    9.4 %        256.1         354.7
    1024   12.5 %       333.1         332.8
    1536   18.8 %       414.5         341.1

i.e. ~0.3 us per active entry sparse against ~40 ns per (row, concept) cell
dense: the crossover is near 12 % density. ``choose_decode`` takes the dense
path above ``DENSE_MIN_DENSITY`` = 10 % (a little early, as the dense matmul
gains more from extra threads). At the reference k=12 (0.15 %) the sparse path
is ~18x faster and the training step always uses it; ``bench/sae_train.py``
prints the same comparison at its own shapes (docs/benchmarks.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DecodeMode = Literal["auto", "sparse", "dense"]

# Above this fraction of active (row, concept) cells the dense matmul decode wins.
DENSE_MIN_DENSITY = 0.10


@dataclass(eq=False)
class SparseLayout:
    """Index orders of one set of codes, computed once and shared by every kernel.

    Codes are stored in (row, concept) order. The decoder wants them grouped by
    bag (group, row) - contiguous bags for embedding_bag, CSR rows for the SDDMM -
    and both backward passes want them grouped by concept.
    """

    n_groups: int
    batch_size: int
    n_concepts: int
    bag_perm: Tensor  # (n,) code position of the i-th entry in (group, row, concept) order
    bag_offsets: Tensor  # (G*B + 1,) CSR row pointers over bags
    bag_concepts: Tensor  # (n,) concept of the i-th entry in bag order
    bag_ids: Tensor  # (n,) bag of each entry, in code order
    concept_perm: Tensor  # (n,) code position of the i-th entry in (concept, row) order
    concept_offsets: Tensor  # (M + 1,) pointers over concepts

    @staticmethod
    def build(
        batch_idx: Tensor,
        concept_idx: Tensor,
        batch_size: int,
        n_concepts: int,
        group_ends: Tensor | None,
        concept_order: tuple[Tensor, Tensor] | None = None,
    ) -> SparseLayout:
        """Orders for codes sorted by (row, concept); group_ends are prefix ends (G,)."""
        device = batch_idx.device
        if group_ends is None or group_ends.numel() <= 1:
            n_groups = 1
            group_n = torch.zeros_like(concept_idx)
        else:
            n_groups = int(group_ends.numel())
            group_n = torch.bucketize(concept_idx, group_ends, right=True)
        bag_ids = group_n * batch_size + batch_idx
        if n_groups == 1:
            bag_perm = torch.arange(batch_idx.numel(), device=device)
        else:
            # stable: rows stay in order inside a group and concepts stay sorted inside a bag
            bag_perm = torch.sort(group_n, stable=True).indices
        bag_offsets = _offsets(bag_ids, n_groups * batch_size)
        concept_perm, concept_offsets = concept_order or concept_order_of(concept_idx, n_concepts)
        return SparseLayout(
            n_groups=n_groups,
            batch_size=batch_size,
            n_concepts=n_concepts,
            bag_perm=bag_perm,
            bag_offsets=bag_offsets,
            bag_concepts=concept_idx[bag_perm],
            bag_ids=bag_ids,
            concept_perm=concept_perm,
            concept_offsets=concept_offsets,
        )


def concept_order_of(concept_idx: Tensor, n_concepts: int) -> tuple[Tensor, Tensor]:
    """(perm, offsets): entries grouped by concept, for the backward passes."""
    return torch.sort(concept_idx, stable=True).indices, _offsets(concept_idx, n_concepts)


def _offsets(ids: Tensor, n_bins: int) -> Tensor:
    """Exclusive prefix sum of bin counts: (n_bins + 1,) pointers into sorted ids."""
    out = torch.zeros(n_bins + 1, dtype=torch.long, device=ids.device)
    if ids.numel():
        torch.cumsum(torch.bincount(ids, minlength=n_bins), 0, out=out[1:])
    return out


@dataclass(eq=False)
class SparseCodes:
    """BatchTopK codes of a batch: the n kept (row, concept, value) triples.

    Entries are sorted by (row, concept). ``values`` carry gradients to the
    encoder parameters; ``min_kept`` is the smallest positive kept activation
    (what the inference threshold tracks); ``pre_bm`` keeps the detached dense
    pre-activations for AuxK, which needs the dead concepts' values.
    """

    values: Tensor  # (n,)
    batch_idx: Tensor  # (n,) int64
    concept_idx: Tensor  # (n,) int64
    batch_size: int
    n_concepts: int
    min_kept: Tensor  # () float, detached; 0 when nothing positive was kept
    pre_bm: Tensor | None = None
    _layouts: dict[tuple[int, ...], SparseLayout] = field(default_factory=dict, repr=False)
    _concept_order: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def density(self) -> float:
        return self.nnz / max(1, self.batch_size * self.n_concepts)

    def concept_order(self) -> tuple[Tensor, Tensor]:
        """(perm, offsets) grouping the entries by concept; cached."""
        if self._concept_order is None:
            self._concept_order = concept_order_of(self.concept_idx, self.n_concepts)
        return self._concept_order

    def layout(self, group_ends: Tensor | None = None) -> SparseLayout:
        """Decoder layout for these prefix ends (None: one group); cached per ends."""
        key = tuple(group_ends.tolist()) if group_ends is not None else ()
        if key not in self._layouts:
            self._layouts[key] = SparseLayout.build(
                self.batch_idx,
                self.concept_idx,
                self.batch_size,
                self.n_concepts,
                group_ends,
                self.concept_order(),
            )
        return self._layouts[key]

    def to_dense(self) -> Tensor:
        """(B, M) codes; differentiable through ``values``."""
        flat = self.batch_idx * self.n_concepts + self.concept_idx
        z = self.values.new_zeros(self.batch_size * self.n_concepts)
        z = z.index_put((flat,), self.values)
        return z.view(self.batch_size, self.n_concepts)

    def fired_counts(self) -> Tensor:
        """(M,) int64: how many rows of the batch each concept fired on (value > 0)."""
        live = self.values.detach() > 0
        return torch.bincount(self.concept_idx[live], minlength=self.n_concepts)

    def l0(self) -> float:
        """Mean number of positive activations per row."""
        return float((self.values.detach() > 0).sum()) / max(1, self.batch_size)


def _sddmm_rows(layout: SparseLayout, grad_bag_d: Tensor, w_md: Tensor) -> Tensor:
    """<w[m_i], grad[bag_i]> for every entry, in bag order (n,)."""
    n = layout.bag_concepts.numel()
    if n == 0:
        return grad_bag_d.new_zeros(0)
    if grad_bag_d.device.type in ("cpu", "cuda") and grad_bag_d.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            csr = torch.sparse_csr_tensor(
                layout.bag_offsets,
                layout.bag_concepts,
                grad_bag_d.new_zeros(n),
                (grad_bag_d.shape[0], w_md.shape[0]),
                check_invariants=False,
            )
            out = torch.sparse.sampled_addmm(csr, grad_bag_d, w_md.t(), beta=0.0, alpha=1.0)
        return out.values()
    bag_rows = torch.repeat_interleave(
        torch.arange(grad_bag_d.shape[0], device=grad_bag_d.device), torch.diff(layout.bag_offsets)
    )
    return torch.linalg.vecdot(grad_bag_d[bag_rows], w_md[layout.bag_concepts])


class _GatherDecode(torch.autograd.Function):
    """Per-group partial reconstructions from sparse codes (see module docstring)."""

    @staticmethod
    def forward(ctx, values_n: Tensor, w_dec_md: Tensor, layout: SparseLayout) -> Tensor:  # type: ignore[override]
        vals_bag = values_n[layout.bag_perm]
        out = F.embedding_bag(
            layout.bag_concepts,
            w_dec_md,
            layout.bag_offsets,
            mode="sum",
            per_sample_weights=vals_bag,
            include_last_offset=True,
        )
        ctx.layout = layout
        ctx.save_for_backward(values_n, w_dec_md)
        return out.view(layout.n_groups, layout.batch_size, w_dec_md.shape[1])

    @staticmethod
    def backward(ctx, grad_gbd: Tensor):  # type: ignore[override]
        with torch.autocast(grad_gbd.device.type, enabled=False):  # in the parameters' dtype
            return _GatherDecode._backward(ctx, grad_gbd.to(ctx.saved_tensors[1].dtype))

    @staticmethod
    def _backward(ctx, grad_gbd: Tensor):
        values_n, w_dec_md = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad_bag_d = grad_gbd.reshape(-1, grad_gbd.shape[-1])
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            g_bag = _sddmm_rows(layout, grad_bag_d, w_dec_md)
            grad_vals = torch.empty_like(values_n)
            grad_vals[layout.bag_perm] = g_bag
        if ctx.needs_input_grad[1]:
            perm = layout.concept_perm
            grad_w = F.embedding_bag(
                layout.bag_ids[perm],
                grad_bag_d,
                layout.concept_offsets,
                mode="sum",
                per_sample_weights=values_n[perm],
                include_last_offset=True,
            )
        return grad_vals, grad_w, None


def sparse_decode_groups(codes: SparseCodes, w_dec_md: Tensor, group_ends: Tensor | None = None) -> Tensor:
    """(G, B, D) partial reconstructions (no bias): group g sums its own concepts only."""
    layout = codes.layout(group_ends)
    return _GatherDecode.apply(codes.values, w_dec_md, layout)


def dense_decode_groups(z_bm: Tensor, w_dec_md: Tensor, group_ends: Tensor | None = None) -> Tensor:
    """Dense fallback of :func:`sparse_decode_groups`: one matmul per group slice."""
    ends = [int(e) for e in group_ends.tolist()] if group_ends is not None else [w_dec_md.shape[0]]
    parts, start = [], 0
    for end in ends:
        parts.append(z_bm[:, start:end] @ w_dec_md[start:end])
        start = end
    return torch.stack(parts, 0)


def choose_decode(codes: SparseCodes, mode: DecodeMode = "auto") -> Literal["sparse", "dense"]:
    """The measured-faster decode for these codes (see module docstring)."""
    if mode != "auto":
        return mode
    return "dense" if codes.density() > DENSE_MIN_DENSITY else "sparse"


def decode_groups(
    codes: SparseCodes, w_dec_md: Tensor, group_ends: Tensor | None = None, mode: DecodeMode = "auto"
) -> Tensor:
    """(G, B, D) per-group partial reconstructions by the faster path; same values and gradients."""
    if choose_decode(codes, mode) == "sparse":
        return sparse_decode_groups(codes, w_dec_md, group_ends)
    return dense_decode_groups(codes.to_dense(), w_dec_md, group_ends)
