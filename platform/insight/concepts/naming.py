"""Naming concepts by their nearest words in the joint space (docs/method.md, Naming).

Two methods, both always computed:

- ``decoder`` (the baseline): name_i = argmax_w cos(d_i, t_w), d_i the decoder row.
- ``family`` (hierarchy-aware): v_i = Dthr[i,:] * M[i,:] keeps concept i and its
  above-threshold parents (Dthr = Dn where Dn > tau, with Dn[i,i] = 1), each
  weighted by relation strength and by its mean activation on i's top patches;
  v_i is rescaled to the mean norm of the M rows times ``family_scale`` and
  decoded, e_i = normalise(v_i W_dec + b_dec), then named by its nearest word.
  A child's bare decoder row is an off-manifold residual; decoded with its
  parents it looks like a real patch of that thing in context.

A concept that never fired has no top patches (M[i,:] = 0); its family vector
is the concept alone at the typical norm, i.e. its decoder row plus b_dec.

Score (``concepts.name_score``). ``cosine`` is the paper's: the word nearest
to the concept embedding. Some words ("hubs") are close to many concepts at
once and then win everywhere. ``csls`` (the default) ranks words by the
cross-domain similarity local scaling of Conneau et al. (2018),
CSLS(i, w) = 2 cos(e_i, t_w) - r_C(i) - r_W(w), with r_C(i) the mean cosine of
concept i to its ``csls_k`` nearest words and r_W(w) the mean cosine of word w
to its ``csls_k`` nearest concepts (among the concepts that fired, when
known). A hub has a large r_W and loses the concepts it is only loosely near;
the stored candidate scores are then CSLS values, not cosines.

Labels. Distinct concepts may share a best name; `distinct_labels` gives each
a label a person can tell apart: the name alone when no other concept has it,
else ``name (qualifier)`` with the first candidate of that concept's list that
differs from the name and from the other same-named concepts' qualifiers, and
``name #id`` when none does. Concepts that never fired are told apart by id
(``name #id``) and leave the bare name to a sole one that fired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from insight.concepts.vocabulary import Vocabulary

SCORES = ("csls", "cosine")


@dataclass
class Names:
    """Top candidate words per concept for one method: indices into the vocabulary and scores.

    ``score`` says what ``score_mk`` holds: ``cosine`` or ``csls`` (module doc).
    """

    method: str
    index_mk: np.ndarray  # int64 (M, K)
    score_mk: np.ndarray  # float32 (M, K)
    score: str = "cosine"

    def best(self, vocab: Vocabulary) -> list[str]:
        return [vocab.words[int(j)] for j in self.index_mk[:, 0]]

    def candidates(self, vocab: Vocabulary, i: int) -> list[tuple[str, float]]:
        return [(vocab.words[int(j)], float(s)) for j, s in zip(self.index_mk[i], self.score_mk[i], strict=True)]


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(x, np.float32)), dim=1)


def neighbourhood_means(emb_md: np.ndarray, text_vd: np.ndarray, k: int, reference: np.ndarray | None = None,
                        block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """CSLS penalties: r_C (M,) mean cosine of each concept to its k nearest words, and r_W (V,) mean cosine
    of each word to its k nearest concepts among ``reference`` (a boolean mask over the M rows; all rows when
    None or empty). Streams over concept blocks, so the (M, V) similarity matrix is never held whole."""
    emb = _unit_rows(emb_md)
    text = _unit_rows(text_vd)
    m, v = emb.shape[0], text.shape[0]
    ref = np.ones(m, bool) if reference is None or not np.any(reference) else np.asarray(reference, bool)
    kc, kw = min(k, v), min(k, int(ref.sum()))
    r_c = np.zeros(m, np.float32)
    top_w: torch.Tensor | None = None  # (<= kw, V) largest concept cosines per word so far
    for s in range(0, m, block):
        sim_bv = emb[s : s + block] @ text.T
        r_c[s : s + block] = torch.topk(sim_bv, kc, dim=1).values.mean(1).numpy()
        rows = torch.from_numpy(ref[s : s + block])
        if rows.any():
            cand = sim_bv[rows] if top_w is None else torch.cat([top_w, sim_bv[rows]])
            top_w = torch.topk(cand, min(kw, cand.shape[0]), dim=0).values
    r_w = top_w.mean(0).numpy() if top_w is not None else np.zeros(v, np.float32)
    return r_c, r_w.astype(np.float32)


def nearest_words(emb_md: np.ndarray, vocab: Vocabulary, k: int, method: str, score: str = "cosine",
                  csls_k: int = 10, reference: np.ndarray | None = None, block: int = 2048) -> Names:
    """Top-k words by ``score`` (``cosine`` or ``csls``, module doc) for each row of ``emb_md`` (rows are
    normalised here); ``reference`` marks the concepts whose neighbourhoods define the words' hubness."""
    if score not in SCORES:
        raise ValueError(f"name score must be one of {SCORES}, got {score!r}")
    k = min(k, len(vocab))
    text_vd = _unit_rows(vocab.text_vd)
    emb = _unit_rows(emb_md)
    if score == "csls" and emb.shape[0]:
        r_c, r_w = neighbourhood_means(emb_md, vocab.text_vd, csls_k, reference, block)
        r_c_t, r_w_t = torch.from_numpy(r_c), torch.from_numpy(r_w)
    idx, val = [], []
    for s in range(0, emb.shape[0], block):
        sim_bv = emb[s : s + block] @ text_vd.T
        if score == "csls":
            sim_bv = 2 * sim_bv - r_c_t[s : s + block, None] - r_w_t[None, :]
        top = torch.topk(sim_bv, k, dim=1)
        idx.append(top.indices)
        val.append(top.values)
    if not idx:
        return Names(method, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), score)
    return Names(method, torch.cat(idx).numpy().astype(np.int64), torch.cat(val).numpy().astype(np.float32), score)


def decoder_names(w_dec_md: np.ndarray, vocab: Vocabulary, k: int, score: str = "cosine", csls_k: int = 10,
                  reference: np.ndarray | None = None) -> Names:
    """The baseline: nearest words of each decoder row."""
    return nearest_words(w_dec_md, vocab, k, "decoder", score, csls_k, reference)


def family_embeddings(w_dec_md: np.ndarray, b_dec_d: np.ndarray, mean_csr: tuple[np.ndarray, np.ndarray, np.ndarray],
                      parents_all: list[list[tuple[int, float]]], family_scale: float) -> np.ndarray:
    """e_i = normalise(v_i W_dec + b_dec) with v_i = Dthr[i,:] * M[i,:] rescaled (module doc); (M, D)."""
    indptr, indices, values = mean_csr
    m = w_dec_md.shape[0]
    row_of = np.repeat(np.arange(m), np.diff(indptr))
    row_norms = np.sqrt(np.bincount(row_of, weights=values.astype(np.float64) ** 2, minlength=m))
    live = row_norms > 0
    target = (float(row_norms[live].mean()) if live.any() else 1.0) * family_scale
    w = torch.from_numpy(np.ascontiguousarray(w_dec_md, np.float32)).double()
    emb = np.zeros((m, w_dec_md.shape[1]), np.float64)
    for i in range(m):
        mean_i = dict(zip(indices[indptr[i]:indptr[i + 1]].tolist(), values[indptr[i]:indptr[i + 1]].tolist(),
                          strict=True))
        fam = [(i, 1.0)] + [(j, s) for j, s in parents_all[i]]  # Dthr[i,i] = Dn[i,i] = 1
        js = [j for j, _ in fam]
        v = np.array([s * mean_i.get(j, 0.0) for j, s in fam], np.float64)
        norm = float(np.linalg.norm(v))
        if norm == 0.0:  # never fired: the concept alone
            js, v, norm = [i], np.array([1.0]), 1.0
        v *= target / norm
        emb[i] = (torch.from_numpy(v) @ w[js]).numpy()
    emb += np.asarray(b_dec_d, np.float64)[None, :]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32)


def family_names(w_dec_md: np.ndarray, b_dec_d: np.ndarray, mean_csr: tuple[np.ndarray, np.ndarray, np.ndarray],
                 parents_all: list[list[tuple[int, float]]], vocab: Vocabulary, k: int,
                 family_scale: float, score: str = "cosine", csls_k: int = 10,
                 reference: np.ndarray | None = None) -> Names:
    """The hierarchy-aware method: nearest words of the decoded family vectors."""
    return nearest_words(family_embeddings(w_dec_md, b_dec_d, mean_csr, parents_all, family_scale), vocab, k,
                         "family", score, csls_k, reference)


def name_spread(best: list[str], frequency: np.ndarray, n: int = 50) -> tuple[int, int]:
    """(distinct names, largest count of one name) among the ``n`` most frequent concepts that fired: the
    figure hubness spoils (one word naming most of them)."""
    freq = np.asarray(frequency, np.float64)
    top = [i for i in np.argsort(-freq, kind="stable")[:n] if freq[i] > 0]
    counts: dict[str, int] = {}
    for i in top:
        counts[best[i]] = counts.get(best[i], 0) + 1
    return len(counts), max(counts.values(), default=0)


def distinct_labels(concepts: list[tuple[int, str, list[str], float | None]]) -> dict[int, str]:
    """Labels a person can tell apart (module doc), by id. ``concepts``: (id, name, candidate names best first,
    frequency); among concepts with one name the more frequent pick their qualifier first. A concept that
    never fired (frequency 0) takes no qualifier from the ones that did: it is ``name #id`` when shared."""
    concepts = sorted(concepts, key=lambda c: (-(c[3] if c[3] is not None else 1.0), c[0]))
    by_name: dict[str, list[tuple[int, list[str], bool]]] = {}
    for cid, name, cands, freq in concepts:
        by_name.setdefault(name, []).append((cid, cands, freq is None or freq > 0))
    labels: dict[int, str] = {}
    for name, group in by_name.items():
        fired = sum(alive for _, _, alive in group)
        if len(group) == 1:
            labels[group[0][0]] = name
            continue
        used: set[str] = set()
        for cid, cands, alive in group:
            if alive and fired == 1:
                labels[cid] = name  # the only one that fired keeps the bare name
                continue
            q = next((c for c in cands if c and c != name and c not in used), None) if alive else None
            if q is None:
                labels[cid] = f"{name} #{cid}"
            else:
                used.add(q)
                labels[cid] = f"{name} ({q})"
    seen: dict[str, int] = {}
    for cid, *_ in concepts:  # a qualified label equal to another concept's label: fall back to the id
        lab = labels[cid]
        if lab in seen:
            name = lab.split(" (")[0]
            labels[cid] = f"{name} #{cid}"
        seen[labels[cid]] = cid
    return labels
