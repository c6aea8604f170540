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
  about k^2 T index-adds) instead of a dense (M, T) x (T, M) product. Memory is
  the M x M accumulator plus one chunk of tokens: 512 MB at M = 8192, whatever
  the number of tokens. bench/concepts.py measures it against the dense product.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from insight.cache.format import CacheReader
    from insight.sae.model import MatryoshkaSAE

log = logging.getLogger(__name__)

FIXED_BITS = 20
FIXED_SCALE = float(2**FIXED_BITS)  # D is stored in units of 2^-20 activation
CHUNK_TOKENS = 4096  # tokens (whole images) processed together
MAX_PAIRS = 1 << 22  # index-adds per block: bounds the temporaries of a chunk


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


class ImageEncoder:
    """Codes (B, H, W, M) of stacks of patch grids, one (H*W, D) x (D, M) product per image.

    A batched matmul (``baddbmm``) over the images of a chunk: every image is
    its own product of the same shape, so a token's code is a function of its
    image alone, never of which images share its chunk (see the module doc),
    and the chunk still runs as one call. Same codes as ``sae.encode`` up to
    float rounding of the folded bias; before theta is learned, the per-token
    top-k of `encode_tokens`.
    """

    def __init__(self, sae: MatryoshkaSAE) -> None:
        self.sae = sae
        with torch.no_grad():
            self.w_dm = sae.W_enc.detach().float().contiguous()
            self.bias_m = (sae.b_enc - sae.b_dec @ sae.W_enc).detach().float().contiguous()
        self.theta = float(sae.threshold)

    def __call__(self, feats_bhwd: np.ndarray | Tensor) -> Tensor:
        x = torch.as_tensor(np.asarray(feats_bhwd, dtype=np.float32)) if isinstance(feats_bhwd, np.ndarray) \
            else feats_bhwd.float()
        b, h, w, d = x.shape
        m = self.sae.n_concepts
        if d != self.sae.d_in:
            raise ValueError(f"features have dim {d}, the SAE expects {self.sae.d_in}")
        with torch.no_grad():
            if self.theta < 0:
                z_bnm = torch.stack([encode_tokens(self.sae, x[i].reshape(h * w, d)) for i in range(b)]) if b \
                    else x.new_zeros(0, h * w, m)
            else:
                x_bnd = x.reshape(b, h * w, d)
                z_bnm = torch.baddbmm(self.bias_m.expand(b, 1, m), x_bnd, self.w_dm.expand(b, d, m))
                z_bnm.masked_fill_(z_bnm <= self.theta, 0.0)
        return z_bnm.view(b, h, w, m)


def encode_images(sae: MatryoshkaSAE, feats_bhwd: np.ndarray | Tensor) -> Tensor:
    """Codes (B, H, W, M) of a stack of patch grids (`ImageEncoder`, built once per call)."""
    return ImageEncoder(sae)(feats_bhwd)


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


def add_pairs(cooc_flat: Tensor, t_w: Tensor, i_w: Tensor, w_fixed: Tensor, t_n: Tensor, j_n: Tensor,
              n_tokens: int, n_concepts: int) -> None:
    """cooc[i, j] += w for every active (t, i, w) and every (t, j) of the same token's neighbourhood.

    ``t_w, i_w, w_fixed``: active entries (token, concept, fixed-point weight),
    ``t_n, j_n``: neighbourhood entries sorted by token. Pairs are expanded in
    blocks of at most MAX_PAIRS so temporaries stay small.
    """
    if t_w.numel() == 0:
        return
    cnt_n = torch.bincount(t_n, minlength=n_tokens)
    start_n = torch.cumsum(cnt_n, 0) - cnt_n
    rep = cnt_n[t_w]  # pairs of each active entry
    first_n = start_n[t_w]  # where its token's neighbourhood entries start
    row_w = i_w * n_concepts
    csum = torch.cumsum(rep, 0)
    e0, n_entries = 0, t_w.numel()
    while e0 < n_entries:
        base = int(csum[e0 - 1]) if e0 else 0
        e1 = max(e0 + 1, int(torch.searchsorted(csum, base + MAX_PAIRS, right=True)))
        r = rep[e0:e1]
        total = int(csum[e1 - 1]) - base
        if total:
            # neighbourhood entry of each pair: its token's first entry + its rank within the token
            offs = csum[e0:e1] - r - base
            f = torch.arange(total) + torch.repeat_interleave(first_n[e0:e1] - offs, r, output_size=total)
            flat = torch.repeat_interleave(row_w[e0:e1], r, output_size=total) + j_n[f]
            cooc_flat.index_add_(0, flat, torch.repeat_interleave(w_fixed[e0:e1], r, output_size=total))
        e0 = e1


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

    def add_chunk(self, z_bhwm: Tensor, ordinals: Sequence[int], ids: Sequence[str]) -> None:
        """Fold the codes of a few whole images into the sums, counts and top tables."""
        b, h, w, m = z_bhwm.shape
        hw = h * w
        n_tok = b * hw
        z_tm = z_bhwm.reshape(n_tok, m)
        act_bhwm = z_bhwm > self.eps
        t_w, i_w = act_bhwm.view(n_tok, m).nonzero(as_tuple=True)  # sorted by token, then concept
        val = z_tm[t_w, i_w]
        w_fixed = torch.round(val.double() * FIXED_SCALE).long()
        if self.radius > 0:
            t_n, j_n = dilate(act_bhwm, self.radius).view(n_tok, m).nonzero(as_tuple=True)
        else:
            t_n, j_n = t_w, i_w
        add_pairs(torch.from_numpy(self.cooc_mm).view(-1), t_w, i_w, w_fixed, t_n, j_n, n_tok, m)
        i_np = i_w.numpy()
        self.count_m += np.bincount(i_np, minlength=m)
        self.tokens += n_tok
        self.images += b

        # top-N candidates: only entries that can enter the table
        ords = np.asarray(ordinals, np.int64)
        t_np = t_w.numpy()
        keys = ords[t_np // hw] * hw + t_np % hw
        vals = val.numpy().astype(np.float32)
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
            self._add_maps(z_bhwm, ords, rows_aff)
        if len(self.codes) > 4 * self.top_n * max(1, min(self.n_concepts, 4096)):
            self.prune()

    def _add_maps(self, z_bhwm: Tensor, ords: np.ndarray, rows: np.ndarray) -> None:
        """Keep the activation map (over its image) of every new entry among the first ``map_top`` of a table row.

        Entries only move down a row as better ones arrive, so an entry that is
        among the first ``map_top`` now was among them when its chunk was seen:
        galleries never need a second pass over the cache.
        """
        hw = self.tokens_per_image
        sub = self.top_key_mn[rows, : min(self.map_top, self.top_n)]
        r_idx, _ = np.nonzero(sub >= 0)
        conc = rows[r_idx]
        keys = sub[sub >= 0]
        ord_k = keys // hw
        pick = [j for j in np.nonzero(np.isin(ord_k, ords))[0] if (int(conc[j]), int(keys[j])) not in self.maps]
        if not pick:
            return
        local = {int(o): j for j, o in enumerate(ords)}
        b_idx = torch.tensor([local[int(ord_k[j])] for j in pick], dtype=torch.long)
        c_idx = torch.from_numpy(conc[pick].astype(np.int64))
        maps_nhw = z_bhwm[b_idx, :, :, c_idx].numpy().astype(np.float16)
        for j, mp in zip(pick, maps_nhw, strict=True):
            self.maps[(int(conc[j]), int(keys[j]))] = mp

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
    for s in shards:
        ids, feats = reader.read_shard(reader.manifest.shards[s])
        keep = [j for j, x in enumerate(ids)
                if split is None or split == "all" or (split == "val") == is_validation(x, val_fraction)]
        for c in range(0, len(keep), per_chunk):
            rows = keep[c : c + per_chunk]
            z_bhwm = encoder(feats[rows])
            stats.add_chunk(z_bhwm, [offsets[s] + j for j in rows], [ids[j] for j in rows])
    stats.prune()
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
