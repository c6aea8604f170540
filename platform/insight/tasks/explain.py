"""Exact concept-level explanations (docs/method.md, Tasks and explanations).

The reconstruction is x^(p) = sum_i z_i(p) d_i + b_dec, so a class logit taken
on it splits exactly into one term per active concept plus a bias term:

    logit_c(p) = cos(x^(p), t_c) = [sum_i z_i(p) (d_i . t_c) + b_dec . t_c] / ||x^(p)||

(t_c unit norm). `Decomposition` keeps those terms for a set of patches
without ever building the dense (patches, concepts, classes) tensor: z is
stored sparsely (`PatchCodes`, about k entries per patch) and d_i . t_c is one
(M, C) matrix, so any class's contributions cost O(active entries). Per-segment
explanations weight each patch by how much it counts in the segment's pixel
sum (the adjoint of the sliding-window assembly, `windows.assemble_adjoint`),
so "concept contributions + bias" reproduces the segment's summed logit
exactly. The same algebra explains zero-shot classification on the pooled
reconstruction, and `coverage_counts` says how many concepts carry 90/95/99 %
of a logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

COVERAGE_LEVELS = (0.9, 0.95, 0.99)
NORM_EPS = 1e-12


# ------------------------------------------------------------------ sparse codes


@dataclass
class PatchCodes:
    """The nonzero entries of the concept codes z (P, M) of P patches, ordered by patch."""

    patch_idx: Tensor  # (n,) long
    concept_idx: Tensor  # (n,) long
    values: Tensor  # (n,) float, the activations z_i(p) > 0
    n_patches: int
    n_concepts: int

    @classmethod
    def from_dense(cls, z_pm: Tensor) -> PatchCodes:
        p, m = z_pm.shape
        patch_idx, concept_idx = (z_pm != 0).nonzero(as_tuple=True)
        return cls(patch_idx, concept_idx, z_pm[patch_idx, concept_idx], p, m)

    @classmethod
    def cat(cls, parts: Sequence[PatchCodes]) -> PatchCodes:
        """Stack codes of consecutive patch blocks (patch indices are shifted)."""
        if not parts:
            raise ValueError("no codes to concatenate")
        offsets = np.cumsum([0] + [c.n_patches for c in parts[:-1]])
        return cls(torch.cat([c.patch_idx + int(o) for c, o in zip(parts, offsets, strict=True)]),
                   torch.cat([c.concept_idx for c in parts]), torch.cat([c.values for c in parts]),
                   int(sum(c.n_patches for c in parts)), parts[0].n_concepts)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> Tensor:
        z_pm = self.values.new_zeros(self.n_patches, self.n_concepts)
        z_pm[self.patch_idx, self.concept_idx] = self.values
        return z_pm

    def to_sparse(self) -> Tensor:
        idx = torch.stack([self.patch_idx, self.concept_idx])
        return torch.sparse_coo_tensor(idx, self.values, (self.n_patches, self.n_concepts),
                                       check_invariants=False).coalesce()

    def concept_values(self, concepts: Sequence[int]) -> Tensor:
        """(K, P) activation maps z_i(p) of a few concepts."""
        out_kp = self.values.new_zeros(len(concepts), self.n_patches)
        for row, i in enumerate(concepts):
            hit = self.concept_idx == int(i)
            out_kp[row, self.patch_idx[hit]] = self.values[hit]
        return out_kp

    def pooled(self, mode: str = "max") -> Tensor:
        """(M,) one vector for all patches: ``max`` (the probe's s) or ``mean`` (pooled codes)."""
        out_m = self.values.new_zeros(self.n_concepts)
        if mode == "max":
            return out_m.scatter_reduce(0, self.concept_idx, self.values, reduce="amax", include_self=True)
        if mode == "mean":
            return out_m.index_add(0, self.concept_idx, self.values) / max(1, self.n_patches)
        raise ValueError(f"pooling mode must be 'max' or 'mean', got {mode!r}")

    def decode(self, sae) -> Tensor:
        """(P, D) reconstructions x^ = z W_dec + b_dec, through a sparse matmul."""
        w_dec = sae.W_dec.detach()
        x_pd = torch.sparse.mm(self.to_sparse().to(w_dec.dtype), w_dec) if self.nnz else \
            w_dec.new_zeros(self.n_patches, w_dec.shape[1])
        return x_pd + sae.b_dec.detach()


@torch.no_grad()
def encode_sparse(sae, x_pd: Tensor, chunk: int = 2048) -> PatchCodes:
    """Inference codes of P patch vectors, encoded ``chunk`` rows at a time and kept sparse.

    The dense (chunk, M) block lives only inside the loop: 2048 x 8192 floats
    is 64 MB, while a whole image's dense codes could be gigabytes.
    """
    x_pd = x_pd.to(sae.W_dec.device, sae.W_dec.dtype)
    if float(sae.threshold) >= 0:  # threshold inference: fused, the dense codes are never written
        c = sae.encode_sparse(x_pd)
        return PatchCodes(c.batch_idx, c.concept_idx, c.values, c.batch_size, c.n_concepts)
    parts = [PatchCodes.from_dense(sae.encode(x_pd[i : i + chunk])) for i in range(0, len(x_pd), chunk)]
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return PatchCodes(empty, empty, torch.zeros(0), 0, sae.n_concepts)
    return PatchCodes.cat(parts)


# ------------------------------------------------------------------ the decomposition


@dataclass
class Decomposition:
    """Class logits of P patches, kept term by term (see the module docstring).

    ``logits()`` = (scatter of the concept terms + ``bias_c``) / ``norm_p``;
    every accessor divides by the norm, so contributions are in logit units.
    """

    codes: PatchCodes
    dt_mc: Tensor  # (M, C) d_i . t_c
    bias_c: Tensor  # (C,) b_dec . t_c
    norm_p: Tensor  # (P,) ||x^(p)||

    @property
    def n_classes(self) -> int:
        return int(self.dt_mc.shape[1])

    def entry_contributions(self, c: int) -> Tensor:
        """(n,) contribution of every active (patch, concept) entry to class c."""
        codes = self.codes
        return codes.values * self.dt_mc[codes.concept_idx, c] / self.norm_p[codes.patch_idx]

    def bias_map(self, c: int) -> Tensor:
        """(P,) the decoder-bias term b_dec . t_c / ||x^(p)||."""
        return self.bias_c[c] / self.norm_p

    def logits(self) -> Tensor:
        """(P, C) logits rebuilt from the terms (equal to cos(x^, t) up to rounding)."""
        codes = self.codes
        raw_nc = codes.values[:, None] * self.dt_mc[codes.concept_idx]
        sums_pc = raw_nc.new_zeros(codes.n_patches, self.n_classes).index_add_(0, codes.patch_idx, raw_nc)
        return (sums_pc + self.bias_c) / self.norm_p[:, None]

    def concept_maps(self, concepts: Sequence[int], c: int) -> Tensor:
        """(K, P) per-patch contribution of a few concepts to class c."""
        return self.codes.concept_values(concepts) * self.dt_mc[list(map(int, concepts)), c][:, None] / self.norm_p

    def weighted_sums(self, weights_p: Tensor, c: int) -> tuple[Tensor, float]:
        """Sum over patches of weights_p * (each concept's term, the bias term) for class c.

        Returns (M,) concept sums and the bias sum; together they are
        sum_p weights_p * logit_c(p).
        """
        codes = self.codes
        per_entry = weights_p[codes.patch_idx] * self.entry_contributions(c)
        concepts_m = per_entry.new_zeros(codes.n_concepts).index_add_(0, codes.concept_idx, per_entry)
        bias = float((weights_p * self.bias_map(c)).sum())
        return concepts_m, bias

    def dense(self, limit: int = 50_000_000) -> Tensor:
        """(P, M, C) every term (small models and tests only; refuses above ``limit`` values)."""
        p, m, c = self.codes.n_patches, self.codes.n_concepts, self.n_classes
        if p * m * c > limit:
            raise ValueError(f"dense contributions would hold {p * m * c:,} values (> {limit:,}); use the sparse "
                             "accessors (concept_maps, weighted_sums)")
        z_pm = self.codes.to_dense()
        return z_pm[:, :, None] * self.dt_mc[None] / self.norm_p[:, None, None]


@torch.no_grad()
def decompose(codes: PatchCodes, sae, text_cd: Tensor) -> Decomposition:
    """The exact per-concept terms of cos(x^(p), t_c) for unit text vectors ``text_cd``."""
    text = F.normalize(text_cd.to(sae.W_dec.device, sae.W_dec.dtype), dim=-1)
    x_pd = codes.decode(sae)
    norm_p = x_pd.norm(dim=-1).clamp_min(NORM_EPS)
    return Decomposition(codes, sae.W_dec.detach() @ text.T, sae.b_dec.detach() @ text.T, norm_p)


def reconstruction_logits(codes: PatchCodes, sae, text_cd: Tensor) -> Tensor:
    """(P, C) cos(x^(p), t_c) computed from the reconstruction itself (no per-concept terms)."""
    text = F.normalize(text_cd.to(sae.W_dec.device, sae.W_dec.dtype), dim=-1)
    x_pd = codes.decode(sae)
    return (x_pd @ text.T) / x_pd.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


# ------------------------------------------------------------------ names and coverage


def concept_namer(model: Any) -> Callable[[int], str]:
    """Concept id -> name, from the model's concept table when it has one, else "concept <id>".

    A ConceptTable gives its distinct labels (same-named concepts told apart, `ConceptTable.label`).

    The table (``LoadedModel.concepts``, an `insight.concepts.ConceptTable`
    written by ``insight concepts``) is looked up at run time, so tasks work
    on models that have none; it is read leniently: any iterable of rows with
    ``id``/``name`` (the ConceptTable), a mapping id -> name or row, a
    DataFrame with a ``name`` column, or an object with a ``names`` list.
    """
    try:
        table = getattr(model, "concepts", None)
    except (FileNotFoundError, KeyError, ValueError, OSError):
        table = None
    names: dict[int, str] = {}
    if table is not None:
        names = _names_from_table(table)

    def name(i: int) -> str:
        return names.get(int(i)) or f"concept {int(i)}"

    return name


def _row_name(row: Any) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        n = row.get("name")
    else:
        n = getattr(row, "name", None)
    return str(n) if n else None


def _names_from_table(table: Any) -> dict[int, str]:
    if callable(getattr(table, "label", None)) and hasattr(table, "concepts"):  # a ConceptTable: distinct labels
        return {int(c.id): table.label(c.id) for c in table.concepts if c.name}
    if hasattr(table, "columns") and "name" in getattr(table, "columns", []):  # a DataFrame
        ids = table["id"].tolist() if "id" in table.columns else list(range(len(table)))
        return {int(i): str(n) for i, n in zip(ids, table["name"].tolist(), strict=True) if n}
    if isinstance(getattr(table, "names", None), (list, tuple)):
        return {i: str(n) for i, n in enumerate(table.names) if n}
    rows = getattr(table, "rows", table)
    if isinstance(rows, dict):
        return {int(k): n for k, v in rows.items() if (n := _row_name(v))}
    if hasattr(rows, "__iter__") and not isinstance(rows, (str, bytes)):  # ConceptTable iterates its rows
        rows = list(rows)
    if isinstance(rows, (list, tuple)):
        out = {}
        for pos, row in enumerate(rows):
            rid = row.get("id", pos) if isinstance(row, dict) else getattr(row, "id", pos)
            if n := _row_name(row):
                out[int(rid)] = n
        return out
    return {}


def coverage_counts(contributions: Tensor | np.ndarray, levels: Sequence[float] = COVERAGE_LEVELS) -> dict[str, int]:
    """How many concepts (largest |contribution| first) carry each share of the total |contribution|.

    Contributions can be negative, so "share of the logit" is measured on
    absolute mass: the smallest n whose top-n |contributions| add up to at
    least ``level`` of all of them. Keys are "90", "95", "99".
    """
    a = np.abs(np.asarray(torch.as_tensor(contributions).detach().cpu(), dtype=np.float64)).ravel()
    total = a.sum()
    out = {}
    cum = np.cumsum(np.sort(a)[::-1])
    for q in levels:
        key = f"{round(q * 100):d}"
        out[key] = 0 if total == 0 else int(min(len(a), np.searchsorted(cum, q * total * (1 - 1e-12)) + 1))
    return out


@dataclass
class ConceptContribution:
    """One concept's share of a class logit (mean per pixel for segments)."""

    concept: int
    name: str
    contribution: float

    def as_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "name": self.name, "contribution": self.contribution}


def top_contributions(contrib_m: Tensor, top: int, namer: Callable[[int], str]) -> list[ConceptContribution]:
    """The ``top`` concepts with the largest contributions (most positive first)."""
    k = min(top, int(contrib_m.numel()))
    vals, idx = torch.topk(contrib_m, k)
    return [ConceptContribution(int(i), namer(int(i)), float(v)) for v, i in zip(vals, idx, strict=True) if float(v) != 0.0]


# ------------------------------------------------------------------ segments


@dataclass
class SegmentExplanation:
    """Why a predicted segment is its class: concept contributions, averaged over its pixels.

    ``concepts_total + bias == mean_logit`` exactly (up to float rounding):
    the class logit of the segment's pixels, averaged, split over concepts.
    """

    label: int
    class_name: str
    pixels: int
    mean_logit: float
    bias: float
    concepts_total: float
    top: list[ConceptContribution]
    coverage: dict[str, int]
    contributions_m: Tensor = field(repr=False)  # (M,) every concept's mean contribution

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "class": self.class_name, "pixels": self.pixels,
                "mean_logit": self.mean_logit, "bias": self.bias, "concepts_total": self.concepts_total,
                "top": [c.as_dict() for c in self.top], "coverage": self.coverage}


def explain_segments(result, top: int = 5, namer: Callable[[int], str] | None = None,
                     max_segments: int | None = None) -> list[SegmentExplanation]:
    """Per-segment concept contributions of a concept-route `SegmentationResult` (largest segments first).

    Background pixels (label 0 with a background class) have no class logit and
    are not explained.
    """
    from insight.tasks.windows import assemble_adjoint

    dec = result.decomposition
    if dec is None:
        raise ValueError("explanations need a segmentation through concepts (via='concepts'); this one is "
                         f"via={result.via!r}")
    namer = namer or (lambda i: f"concept {i}")
    labels_hw = torch.as_tensor(result.labels_hw)
    offset = 1 if result.background else 0
    present, counts = torch.unique(labels_hw, return_counts=True)
    segs = [(int(lab), int(n)) for lab, n in zip(present, counts, strict=True) if int(lab) >= offset]
    segs.sort(key=lambda t: -t[1])
    if max_segments is not None:
        segs = segs[:max_segments]
    if not segs:
        return []
    masks_shw = torch.stack([(labels_hw == lab).float() for lab, _ in segs])
    weights_sp = assemble_adjoint(masks_shw, result.plan).permute(1, 0, 2, 3).reshape(len(segs), -1)
    out = []
    for s, (lab, npix) in enumerate(segs):
        c = lab - offset
        concepts_m, bias = dec.weighted_sums(weights_sp[s].to(dec.norm_p), c)
        concepts_m = concepts_m.cpu() / npix
        mean_logit = float(result.logits_fhw[c][labels_hw == lab].double().mean())
        out.append(SegmentExplanation(
            label=lab, class_name=result.class_names[lab], pixels=npix, mean_logit=mean_logit,
            bias=bias / npix, concepts_total=float(concepts_m.double().sum()),
            top=top_contributions(concepts_m, top, namer), coverage=coverage_counts(concepts_m),
            contributions_m=concepts_m))
    return out


def segment_concept_maps(result, label: int, concepts: Sequence[int]) -> Tensor:
    """(K, H, W) pixel maps of a few concepts' contributions to the class of ``label``.

    Summed over all concepts and added to the bias map they give the class's
    logit map exactly (every step of the assembly is linear).
    """
    from insight.tasks.windows import assemble

    dec = result.decomposition
    if dec is None:
        raise ValueError("concept maps need a segmentation through concepts (via='concepts')")
    c = label - (1 if result.background else 0)
    if not 0 <= c < dec.n_classes:
        raise ValueError(f"label {label} is not a class with a logit (background or out of range)")
    maps_kp = dec.concept_maps(concepts, c).cpu()
    n, (gh, gw) = result.plan.n_windows, result.plan.grid_hw
    maps_nkgg = maps_kp.reshape(len(concepts), n, gh, gw).permute(1, 0, 2, 3)
    return assemble(maps_nkgg, result.plan)


def segment_bias_map(result, label: int) -> Tensor:
    """(H, W) the decoder-bias term of the class of ``label`` at every pixel."""
    from insight.tasks.windows import assemble

    dec = result.decomposition
    c = label - (1 if result.background else 0)
    n, (gh, gw) = result.plan.n_windows, result.plan.grid_hw
    return assemble(dec.bias_map(c).cpu().reshape(n, 1, gh, gw), result.plan)[0]
