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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from insight.concepts.vocabulary import Vocabulary


@dataclass
class Names:
    """Top candidate words per concept for one method: indices into the vocabulary and cosines."""

    method: str
    index_mk: np.ndarray  # int64 (M, K)
    score_mk: np.ndarray  # float32 (M, K)

    def best(self, vocab: Vocabulary) -> list[str]:
        return [vocab.words[int(j)] for j in self.index_mk[:, 0]]

    def candidates(self, vocab: Vocabulary, i: int) -> list[tuple[str, float]]:
        return [(vocab.words[int(j)], float(s)) for j, s in zip(self.index_mk[i], self.score_mk[i], strict=True)]


def nearest_words(emb_md: np.ndarray, vocab: Vocabulary, k: int, method: str, block: int = 2048) -> Names:
    """Top-k words by cosine for each row of ``emb_md`` (rows are normalised here)."""
    k = min(k, len(vocab))
    text_vd = torch.from_numpy(np.ascontiguousarray(vocab.text_vd, np.float32))
    emb = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(emb_md, np.float32)), dim=1)
    idx, val = [], []
    for s in range(0, emb.shape[0], block):
        sim_bv = emb[s : s + block] @ text_vd.T
        top = torch.topk(sim_bv, k, dim=1)
        idx.append(top.indices)
        val.append(top.values)
    if not idx:
        return Names(method, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
    return Names(method, torch.cat(idx).numpy().astype(np.int64), torch.cat(val).numpy().astype(np.float32))


def decoder_names(w_dec_md: np.ndarray, vocab: Vocabulary, k: int) -> Names:
    """The baseline: nearest words of each decoder row."""
    return nearest_words(w_dec_md, vocab, k, "decoder")


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
                 family_scale: float) -> Names:
    """The hierarchy-aware method: nearest words of the decoded family vectors."""
    return nearest_words(family_embeddings(w_dec_md, b_dec_d, mean_csr, parents_all, family_scale), vocab, k,
                         "family")
