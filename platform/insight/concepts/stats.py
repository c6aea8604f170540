"""Streaming concept statistics over an activation cache (docs/method.md, Relations).

One pass over the cache's patch tokens gives, for every concept i of an SAE:

- ``count[i]``: tokens where z_i > eps (A_t,i = 1); frequency = count / tokens.
- The activation-weighted co-occurrence D[i,j] = sum_t z_i(t) N_t,j with N = A
  (same patch, radius 0) or A dilated over the patch grid by a Chebyshev radius
  r (j active anywhere within r patches of t, t included). D[i,i] is concept i's
  activation mass and Dn = D / diag(D) (`dn_rows`).
- The ``top_n`` most activating patches (image, row, col, activation) and the
  active code of each (z(t) where z > eps), from which M[i,:], the mean concept
  vector over i's top patches, follows (`mean_vectors`); for the first ``map_top`` of them also
  the concept's map over the whole image, which galleries draw (`top_map`).

Why it looks like this:

- Sparse, never dense in tokens. Only the ~k active concepts of a token matter,
  so D is accumulated from the active pairs of each token (sum_t |A_t| |N_t|,
  about k^2 T exact scatter-adds) instead of a dense (M, T) x (T, M) product.
  The encoder's dense output is thresholded a few images at a time while it
  is in cache and only its nonzero entries go on (`GridCodes`); counts, D,
  the top-N tables and the maps are all computed from those. Memory is the
  M x M accumulator plus one chunk of sparse codes and one small dense block:
  512 MB at M = 8192, whatever the number of tokens. bench/concepts.py
  measures it against the dense product, stage by stage (`stage_seconds`).
- Exact and split-invariant. Codes are computed image by image (one matmul
  shape for every image, so a token's code never depends on which tokens share
  its batch), D is accumulated in int64 fixed point (units of 2^-20, room for
  8.8e12 units of activation mass per pair: billions of tokens), and top-N
  ties break on a global token key. Integer addition is associative, so
  partial sums over any split of the shards add up bit for bit to the
  one-shard result; float partial sums would differ in the last bits with the
  order in which Ray tasks finish.
- Distributed. Shards are grouped into Ray tasks; each returns a `ConceptStats`
  partial and the driver merges partials as they finish.

Activations in (0, eps] count as zero (below the activity floor by the
definition of eps), so Dn[i,i] = 1 and 0 <= Dn <= 1. Before an SAE has learned
its inference threshold theta (theta < 0), its BatchTopK encoding would make a
token's code depend on the rest of the batch; such models are encoded with a
per-token top-k instead (`encode_tokens`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from insight.cache.format import CacheReader
    from insight.sae.model import MatryoshkaSAE

log = logging.getLogger(__name__)

FIXED_BITS = 20
FIXED_SCALE = float(2**FIXED_BITS)  # D is stored in units of 2^-20 activation
CHUNK_TOKENS = 16384  # tokens (whole images) folded in together: one D product, one top-N merge
BLOCK_VALUES = 1 << 21  # pre-activations encoded at once (8 MB): a block is thresholded while it is in cache


# ------------------------------------------------------------------ encoding


def encode_tokens(sae: MatryoshkaSAE, x_nd: Tensor) -> Tensor:
    """Inference codes (N, M) that depend on each token alone.

    With a learned threshold this is ``sae.encode`` (z * 1[pre > theta]);
    before it (theta < 0) a per-token top-k replaces the batch-dependent
    BatchTopK, so statistics never depend on how tokens were batched.
    """
    pre_nm = sae.pre_acts(x_nd)
    theta = float(sae.threshold)
    if theta >= 0:
        return pre_nm * (pre_nm > theta)
    top = torch.topk(pre_nm, min(sae.k, pre_nm.shape[1]), dim=1)
    return torch.zeros_like(pre_nm).scatter_(1, top.indices, top.values.clamp_min(0))


class GridCodes(NamedTuple):
    """Sparse codes of a stack of whole images: the entries with z > 0.

    ``token`` is ``image * H*W + row * W + col`` within the stack; entries are
    sorted by token, then concept (row-major order of the dense (B, H, W, M) codes).
    """

    images: int
    token: np.ndarray  # int64
    concept: np.ndarray  # int64
    value: np.ndarray  # float32


class ImageEncoder:
    """Sparse codes (`GridCodes`) of stacks of patch grids, one (H*W, D) x (D, M) product per image.

    Every image is its own product of the same shape (a batched ``baddbmm``
    into a reused block), so a token's code is a function of its image alone,
    never of which images share its chunk (see the module doc). A block of a few images is
    thresholded and its entries extracted while it is in cache: the dense
    (B, M) codes are written once, never masked or copied. Same codes as
    ``sae.encode`` up to float rounding of the folded bias; before theta is
    learned, the per-token top-k of `encode_tokens`.
    """

    def __init__(self, sae: MatryoshkaSAE) -> None:
        self.sae = sae
        with torch.no_grad():
            self.w_dm = sae.W_enc.detach().float().contiguous()
            self.bias_m = (sae.b_enc - sae.b_dec @ sae.W_enc).detach().float().contiguous()
        self.theta = float(sae.threshold)

    def __call__(self, feats_bhwd: np.ndarray | Tensor) -> GridCodes:
        x = torch.as_tensor(np.ascontiguousarray(feats_bhwd, dtype=np.float32)) \
            if isinstance(feats_bhwd, np.ndarray) else feats_bhwd.float().contiguous()
        b, h, w, d = x.shape
        hw, m = h * w, self.sae.n_concepts
        if d != self.sae.d_in:
            raise ValueError(f"features have dim {d}, the SAE expects {self.sae.d_in}")
        per = max(1, BLOCK_VALUES // max(1, hw * m))
        block = torch.empty(min(b, per), hw, m)
        flats: list[np.ndarray] = []
        values: list[np.ndarray] = []
        floor = max(self.theta, 0.0)  # z = pre * 1[pre > theta] (theta >= 0); top-k codes are >= 0
        with torch.no_grad():
            for s in range(0, b, per):
                e = min(b, s + per)
                if self.theta < 0:
                    for j in range(s, e):
                        block[j - s] = encode_tokens(self.sae, x[j].view(hw, d))
                else:  # one batched call, one (H*W, D) x (D, M) product per image: no thread barrier per image
                    torch.baddbmm(self.bias_m.expand(e - s, 1, m), x[s:e].view(e - s, hw, d),
                                  self.w_dm.expand(e - s, d, m), out=block[: e - s])
                pre = block[: e - s].numpy().reshape(-1)
                flat = np.flatnonzero(pre > floor)
                values.append(pre[flat])
                flats.append(flat + s * hw * m)
        flat = np.concatenate(flats) if flats else np.zeros(0, np.int64)
        token = flat // m
        return GridCodes(b, token, flat - token * m,
                         np.concatenate(values) if values else np.zeros(0, np.float32))


def dilate(act_bhwm: Tensor, radius: int) -> Tensor:
    """Boolean dilation over the grid by a square (Chebyshev) window of ``radius``.

    Separable: OR over column shifts, then over row shifts; no padding wraps.
    """
    if radius <= 0:
        return act_bhwm
    rows = act_bhwm.clone()
    for d in range(1, radius + 1):
        rows[:, :, d:] |= act_bhwm[:, :, :-d]
        rows[:, :, :-d] |= act_bhwm[:, :, d:]
    out = rows.clone()
    for d in range(1, radius + 1):
        out[:, d:] |= rows[:, :-d]
        out[:, :-d] |= rows[:, d:]
    return out


def neighbourhood(t_w: np.ndarray, i_w: np.ndarray, images: int, grid: tuple[int, int], n_concepts: int,
                  radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries (t, j) of A dilated over each image's grid by ``radius``, sorted by token then concept.

    ``t_w, i_w``: the active entries, sorted by token. Dilated a few images at
    a time (a dense boolean block of at most BLOCK_VALUES entries).
    """
    hw = grid[0] * grid[1]
    m = n_concepts
    per = max(1, BLOCK_VALUES // max(1, hw * m))
    flats = []
    for s in range(0, images, per):
        e = min(images, s + per)
        lo, hi = np.searchsorted(t_w, [s * hw, e * hw])
        blk = torch.zeros((e - s) * hw * m, dtype=torch.bool)
        blk[torch.from_numpy((t_w[lo:hi] - s * hw) * m + i_w[lo:hi])] = True
        flats.append(np.flatnonzero(dilate(blk.view(e - s, grid[0], grid[1], m), radius).numpy()) + s * hw * m)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int64)
    t_n = flat // m
    return t_n, flat - t_n * m


def _small(a: np.ndarray) -> np.ndarray:
    """``a`` as uint16 when its values fit (NumPy's stable sort is then a radix sort)."""
    return a.astype(np.uint16) if a.size and 0 <= a.min() and a.max() < 1 << 16 else a


def add_cooc(cooc_mm: np.ndarray, t_w: np.ndarray, i_w: np.ndarray, w_fixed: np.ndarray, t_n: np.ndarray,
             j_n: np.ndarray, n_tokens: int) -> None:
    """cooc[i, j] += w for every active (t, i, w) and every (t, j) of the same token's neighbourhood.

    ``t_w, i_w, w_fixed``: active entries (token, concept, fixed-point weight),
    ``t_n, j_n``: neighbourhood entries sorted by token. Active entries are
    grouped by the size q of their token's neighbourhood, so each group's
    pairs are one (entries, q) index block and one exact int64 scatter-add
    (``np.add.at``): about sum_t |A_t| |N_t| adds, a few dozen NumPy calls
    per chunk, no per-pair Python.
    """
    if t_w.size == 0:
        return
    m = cooc_mm.shape[0]
    flat_mm = cooc_mm.reshape(-1)
    cnt_n = np.bincount(t_n, minlength=n_tokens)
    start_n = np.cumsum(cnt_n) - cnt_n
    q_e = cnt_n[t_w]
    # entries by q, then by concept: each group's scatter walks the accumulator row by row (2x fewer cache misses)
    order = np.argsort(_small(i_w), kind="stable")
    order = order[np.argsort(_small(q_e[order]), kind="stable")]
    q_sorted = q_e[order]
    cuts = np.flatnonzero(np.diff(q_sorted)) + 1
    for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, order.size].tolist(), strict=True):
        q = int(q_sorted[lo])
        if q == 0:
            continue
        e = order[lo:hi]
        idx = j_n[start_n[t_w[e]][:, None] + np.arange(q)]
        idx += (i_w[e] * m)[:, None]
        np.add.at(flat_mm, idx.reshape(-1), np.repeat(w_fixed[e], q))


def merge_top(val_mn: np.ndarray, key_mn: np.ndarray, concept: np.ndarray, val: np.ndarray,
              key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per concept, the N best of (table row + candidates): activation desc, then key asc.

    Only the rows of concepts with candidates are re-sorted, in place (the
    arrays must be writable). The order is total (keys are unique per token),
    so the result does not depend on the order in which candidates arrive.
    """
    if concept.size == 0:
        return val_mn, key_mn
    n = val_mn.shape[1]
    rows = np.unique(concept)
    sub_key = key_mn[rows]
    have = sub_key >= 0
    conc = np.concatenate([np.nonzero(have)[0], np.searchsorted(rows, concept)])
    vals = np.concatenate([val_mn[rows][have], val.astype(np.float32)])
    keys = np.concatenate([sub_key[have], key.astype(np.int64)])
    order = np.lexsort((keys, -vals, conc))
    conc, vals, keys = conc[order], vals[order], keys[order]
    rank = np.arange(conc.size) - np.searchsorted(conc, conc, side="left")
    keep = rank < n
    out_val = np.full((rows.size, n), -np.inf, np.float32)
    out_key = np.full((rows.size, n), -1, np.int64)
    out_val[conc[keep], rank[keep]] = vals[keep]
    out_key[conc[keep], rank[keep]] = keys[keep]
    val_mn[rows] = out_val
    key_mn[rows] = out_key
    return val_mn, key_mn


# ------------------------------------------------------------------ the partial sums


@dataclass
class ConceptStats:
    """Mergeable statistics of a set of images (a partial) or of the whole cache.

    Token keys are ``ordinal * H*W + row * W + col`` with ``ordinal`` the image's
    position in the cache (manifest order), unique across shards.
    """

    n_concepts: int
    grid: tuple[int, int]
    top_n: int
    eps: float
    radius: int
    map_top: int = 0  # keep the concept's map over the image of its first map_top top patches
    tokens: int = 0
    images: int = 0
    count_m: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 (M,)
    cooc_mm: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 (M, M), units 2^-20
    top_val_mn: np.ndarray = field(default=None)  # type: ignore[assignment]  # float32 (M, N), -inf empty
    top_key_mn: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64 (M, N), -1 empty
    codes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (idx, z)
    image_ids: dict[int, str] = field(default_factory=dict)  # ordinal -> image id
    maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (concept, key) -> float16 (H, W)
    seconds: float = 0.0  # summed task time
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed time per stage (read, encode, ...)

    def __post_init__(self) -> None:
        m, n = self.n_concepts, self.top_n
        if self.count_m is None:
            self.count_m = np.zeros(m, np.int64)
        if self.cooc_mm is None:
            self.cooc_mm = np.zeros((m, m), np.int64)
        if self.top_val_mn is None:
            self.top_val_mn = np.full((m, n), -np.inf, np.float32)
        if self.top_key_mn is None:
            self.top_key_mn = np.full((m, n), -1, np.int64)

    # ---------------------------------------------------------------- accumulate

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def add_codes(self, codes: GridCodes, ordinals: Sequence[int], ids: Sequence[str]) -> None:
        """Fold the sparse codes of a few whole images into the sums, counts and top tables."""
        t0 = time.perf_counter()
        hw, m = self.tokens_per_image, self.n_concepts
        b = codes.images
        n_tok = b * hw
        act = codes.value > self.eps  # z in (0, eps] is below the activity floor
        if act.all():
            t_np, i_np, vals = codes.token, codes.concept, codes.value
        else:
            t_np, i_np, vals = codes.token[act], codes.concept[act], codes.value[act]
        self.count_m += np.bincount(i_np, minlength=m)
        self.tokens += n_tok
        self.images += b
        if t_np.size:
            w_fixed = np.rint(vals.astype(np.float64) * FIXED_SCALE).astype(np.int64)
            if self.radius > 0:
                t_n, j_n = neighbourhood(t_np, i_np, b, self.grid, m, self.radius)
            else:
                t_n, j_n = t_np, i_np
            add_cooc(self.cooc_mm, t_np, i_np, w_fixed, t_n, j_n, n_tok)
        t1 = time.perf_counter()
        self.stage_seconds["cooc"] = self.stage_seconds.get("cooc", 0.0) + t1 - t0
        try:
            self._add_top(codes, t_np, i_np, vals, ordinals, ids)
        finally:
            self.stage_seconds["top"] = self.stage_seconds.get("top", 0.0) + time.perf_counter() - t1

    def _add_top(self, codes: GridCodes, t_np: np.ndarray, i_np: np.ndarray, vals: np.ndarray,
                 ordinals: Sequence[int], ids: Sequence[str]) -> None:
        """Top-N candidates of the active entries (t_np, i_np, vals): only entries that can enter the table."""
        hw = self.tokens_per_image
        ords = np.asarray(ordinals, np.int64)
        keys = ords[t_np // hw] * hw + t_np % hw
        vals = vals.astype(np.float32, copy=False)
        floor = self.top_val_mn[i_np, self.top_n - 1]
        cand = vals >= floor
        if not cand.any():
            return
        cand_keys = keys[cand]
        self.top_val_mn, self.top_key_mn = merge_top(self.top_val_mn, self.top_key_mn, i_np[cand], vals[cand],
                                                     cand_keys)
        # sparse codes of the tokens that entered the table (only changed rows can hold them)
        rows_aff = np.unique(i_np[cand])
        entered = np.unique(cand_keys[np.isin(cand_keys, self.top_key_mn[rows_aff])])
        new = np.array([k for k in entered.tolist() if k not in self.codes], np.int64)
        if new.size:
            local = {int(o): j for j, o in enumerate(ords)}
            t_new = np.array([local[int(k // hw)] * hw + int(k % hw) for k in new], np.int64)
            sel = np.isin(t_np, t_new)  # their active entries, grouped by token (t_np is sorted)
            t_sel, c_sel, v_sel = t_np[sel], i_np[sel].astype(np.int32), vals[sel]
            lo, hi = np.searchsorted(t_sel, t_new, "left"), np.searchsorted(t_sel, t_new, "right")
            for k, start, stop in zip(new.tolist(), lo.tolist(), hi.tolist(), strict=True):
                self.codes[k] = (c_sel[start:stop], v_sel[start:stop])
            for j, o in enumerate(ords):
                self.image_ids[int(o)] = ids[j]
        if self.map_top:
            self._add_maps(codes, ords, rows_aff)
        if len(self.codes) > 4 * self.top_n * max(1, min(self.n_concepts, 4096)):
            self.prune()

    def _add_maps(self, codes: GridCodes, ords: np.ndarray, rows: np.ndarray) -> None:
        """Keep the activation map (over its image) of every new entry among the first ``map_top`` of a table row.

        Entries only move down a row as better ones arrive, so an entry that is
        among the first ``map_top`` now was among them when its chunk was seen:
        galleries never need a second pass over the cache. A map is the
        concept's z over the image, rebuilt from the image's sparse codes.
        """
        hw, m = self.tokens_per_image, self.n_concepts
        sub = self.top_key_mn[rows, : min(self.map_top, self.top_n)]
        r_idx, _ = np.nonzero(sub >= 0)
        conc = rows[r_idx]
        keys = sub[sub >= 0]
        ord_k = keys // hw
        pick = [j for j in np.nonzero(np.isin(ord_k, ords))[0] if (int(conc[j]), int(keys[j])) not in self.maps]
        if not pick:
            return
        local = {int(o): j for j, o in enumerate(ords)}
        want = np.array([local[int(ord_k[j])] * m + int(conc[j]) for j in pick], np.int64)  # image * M + concept
        uniq, inv = np.unique(want, return_inverse=True)
        entry = (codes.token // hw) * m + codes.concept
        sel = np.nonzero(np.isin(entry, uniq))[0]
        maps_nt = np.zeros((uniq.size, hw), np.float32)
        maps_nt[np.searchsorted(uniq, entry[sel]), codes.token[sel] % hw] = codes.value[sel]
        maps_nhw = maps_nt.astype(np.float16).reshape(uniq.size, *self.grid)
        for j, u in zip(pick, inv.tolist(), strict=True):
            self.maps[(int(conc[j]), int(keys[j]))] = maps_nhw[u]

    def top_map(self, i: int, rank: int) -> np.ndarray | None:
        """Concept i's activation map (H, W) over the image of its rank-th top patch, if kept."""
        k = int(self.top_key_mn[i, rank]) if rank < self.top_n else -1
        return None if k < 0 else self.maps.get((i, k))

    def prune(self) -> None:
        """Drop codes and image ids of tokens that left the top tables."""
        live = np.unique(self.top_key_mn[self.top_key_mn >= 0])
        live_set = set(live.tolist())
        self.codes = {k: v for k, v in self.codes.items() if k in live_set}
        ords = set((live // self.tokens_per_image).tolist())
        self.image_ids = {o: i for o, i in self.image_ids.items() if o in ords}
        if self.maps:
            g = min(self.map_top, self.top_n)
            rows, cols = np.nonzero(self.top_key_mn[:, :g] >= 0)
            keep = set(zip(rows.tolist(), self.top_key_mn[rows, cols].tolist(), strict=True))
            self.maps = {ck: v for ck, v in self.maps.items() if ck in keep}

    def merge(self, other: ConceptStats) -> ConceptStats:
        """Add another partial into this one (in place); returns self."""
        if (other.n_concepts, tuple(other.grid), other.top_n, other.eps, other.radius) != (
                self.n_concepts, tuple(self.grid), self.top_n, self.eps, self.radius):
            raise ValueError("cannot merge concept statistics of different shapes or settings")
        for name in ("count_m", "cooc_mm", "top_val_mn", "top_key_mn"):  # Ray's object store gives read-only views
            if not getattr(self, name).flags.writeable:
                setattr(self, name, getattr(self, name).copy())
        self.tokens += other.tokens
        self.images += other.images
        self.seconds += other.seconds
        for k, v in other.stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v
        self.count_m += other.count_m
        self.cooc_mm += other.cooc_mm
        have = other.top_key_mn >= 0
        self.top_val_mn, self.top_key_mn = merge_top(self.top_val_mn, self.top_key_mn, np.nonzero(have)[0],
                                                     other.top_val_mn[have], other.top_key_mn[have])
        self.codes.update(other.codes)
        self.image_ids.update(other.image_ids)
        self.maps.update(other.maps)
        self.prune()
        return self

    # ---------------------------------------------------------------- results

    @property
    def mass_m(self) -> np.ndarray:
        """Activation mass per concept, sum_t z_i(t) A_t,i (float64)."""
        return np.diagonal(self.cooc_mm).astype(np.float64) / FIXED_SCALE

    @property
    def frequency_m(self) -> np.ndarray:
        return self.count_m / max(1, self.tokens)

    def dn_rows(self, start: int, stop: int) -> np.ndarray:
        """Dn[start:stop, :] = D / D[i,i] as float64 (rows of concepts that never fired are 0)."""
        diag = np.diagonal(self.cooc_mm)[start:stop].astype(np.float64)
        rows = self.cooc_mm[start:stop].astype(np.float64)
        safe = np.where(diag > 0, diag, 1.0)
        return np.where(diag[:, None] > 0, rows / safe[:, None], 0.0)

    def top_patches(self, i: int) -> list[tuple[str, int, int, float]]:
        """(image id, row, col, activation) of concept i's top patches, best first."""
        hw, w = self.tokens_per_image, self.grid[1]
        out = []
        for k, v in zip(self.top_key_mn[i], self.top_val_mn[i], strict=True):
            if k < 0:
                break
            pos = int(k % hw)
            out.append((self.image_ids[int(k // hw)], pos // w, pos % w, float(v)))
        return out

    def mean_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """M[i,:] (mean code over i's top patches) as CSR (indptr, indices int32, values float32)."""
        indptr = [0]
        indices: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for i in range(self.n_concepts):
            keys = self.top_key_mn[i][self.top_key_mn[i] >= 0]
            if keys.size == 0:
                indptr.append(indptr[-1])
                continue
            idx = np.concatenate([self.codes[int(k)][0] for k in keys])
            val = np.concatenate([self.codes[int(k)][1] for k in keys]).astype(np.float64)
            uniq, inv = np.unique(idx, return_inverse=True)
            mean = np.bincount(inv, weights=val, minlength=uniq.size) / keys.size
            indices.append(uniq.astype(np.int32))
            values.append(mean.astype(np.float32))
            indptr.append(indptr[-1] + uniq.size)
        cat_i = np.concatenate(indices) if indices else np.zeros(0, np.int32)
        cat_v = np.concatenate(values) if values else np.zeros(0, np.float32)
        return np.asarray(indptr, np.int64), cat_i, cat_v


# ------------------------------------------------------------------ passes


def shard_image_offsets(reader: CacheReader) -> list[int]:
    """Ordinal of the first image of every shard (manifest order)."""
    offs, total = [], 0
    for info in reader.manifest.shards:
        offs.append(total)
        total += info.images
    return offs


def partial_stats(reader: CacheReader, shards: Iterable[int], sae: MatryoshkaSAE, *, eps: float, radius: int,
                  top_n: int, split: str | None = None, val_fraction: float = 0.0, map_top: int = 0,
                  chunk_tokens: int = CHUNK_TOKENS) -> ConceptStats:
    """Statistics of some shards (by position in the manifest), in this process."""
    from insight.cache.format import is_validation
    from insight.sae.step import keep_freed_memory

    keep_freed_memory()  # chunk temporaries are re-allocated every chunk: no page faults for each
    t0 = time.perf_counter()
    grid = tuple(reader.manifest.grid)
    stats = ConceptStats(sae.n_concepts, grid, top_n, eps, radius, map_top)
    encoder = ImageEncoder(sae)
    offsets = shard_image_offsets(reader)
    per_chunk = max(1, chunk_tokens // (grid[0] * grid[1]))
    spent = stats.stage_seconds
    for s in shards:
        t_read = time.perf_counter()
        ids, feats = reader.read_shard(reader.manifest.shards[s])
        keep = [j for j, x in enumerate(ids)
                if split is None or split == "all" or (split == "val") == is_validation(x, val_fraction)]
        spent["read"] = spent.get("read", 0.0) + time.perf_counter() - t_read
        for c in range(0, len(keep), per_chunk):
            rows = keep[c : c + per_chunk]
            t_enc = time.perf_counter()
            codes = encoder(feats[rows])
            spent["encode"] = spent.get("encode", 0.0) + time.perf_counter() - t_enc
            stats.add_codes(codes, [offsets[s] + j for j in rows], [ids[j] for j in rows])
    t_prune = time.perf_counter()
    stats.prune()
    spent["top"] = spent.get("top", 0.0) + time.perf_counter() - t_prune
    stats.seconds = time.perf_counter() - t0
    return stats


def sae_blob(sae: MatryoshkaSAE) -> dict[str, Any]:
    """What a Ray task needs to rebuild the SAE: its shape and weights as NumPy (no pickled modules)."""
    return {"config": sae.config_dict(), "state": {k: v.detach().cpu().numpy() for k, v in sae.state_dict().items()}}


def sae_from_blob(blob: dict[str, Any]) -> MatryoshkaSAE:
    from insight.sae.model import MatryoshkaSAE

    shape = dict(blob["config"])
    dtype = getattr(torch, shape.pop("dtype", "float32"))
    sae = MatryoshkaSAE(shape["d_in"], shape["n_concepts"], shape["group_sizes"], shape["k"], aux_k=shape["aux_k"],
                        threshold_beta=shape["threshold_beta"], threshold_start_step=shape["threshold_start_step"],
                        seed=0, dtype=dtype)
    sae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in blob["state"].items()})
    return sae.eval()


def _stats_task(location: str, shards: list[int], blob: dict[str, Any], params: dict[str, Any]) -> ConceptStats:
    """Ray task body: one group of shards -> one partial."""
    from insight.cache.format import CacheReader

    return partial_stats(CacheReader(location), shards, sae_from_blob(blob), **params)


def plan_tasks(reader: CacheReader, tasks: int) -> list[list[int]]:
    """Contiguous groups of shards with about equal token counts (at most one group per shard)."""
    infos = reader.manifest.shards
    n = max(1, min(tasks, len(infos)))
    total = sum(s.tokens for s in infos)
    groups: list[list[int]] = [[] for _ in range(n)]
    seen = 0
    for s, info in enumerate(infos):
        g = min(n - 1, int(seen * n / max(1, total)))
        groups[g].append(s)
        seen += info.tokens
    return [g for g in groups if g]


def compute_stats(reader: CacheReader, sae: MatryoshkaSAE, *, eps: float, radius: int, top_n: int,
                  split: str | None = None, val_fraction: float = 0.0, tasks: int | None = None,
                  map_top: int = 0, num_cpus: float = 1.0) -> ConceptStats:
    """The whole pass as Ray tasks over groups of shards; partials are merged as they finish.

    ``tasks`` defaults to the cluster's CPU count; ``map_top`` keeps the maps
    galleries draw (`ConceptStats.top_map`). Ray must be initialised
    (`insight.runtime.ensure_ray`).
    """
    import ray

    if not reader.manifest.shards:
        raise ValueError(f"cache {reader.location} has no shards")
    if tasks is None:
        tasks = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
    groups = plan_tasks(reader, tasks)
    blob_ref = ray.put(sae_blob(sae))
    params = {"eps": eps, "radius": radius, "top_n": top_n, "split": split, "val_fraction": val_fraction,
              "map_top": map_top}
    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(_stats_task)
    pending = [remote.remote(reader.location, g, blob_ref, params) for g in groups]
    total: ConceptStats | None = None
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        part: ConceptStats = ray.get(ready[0])
        total = part if total is None else total.merge(part)
        done += 1
        log.info("concepts: %d/%d partials merged (%d tokens)", done, len(groups), total.tokens)
    assert total is not None
    return total
