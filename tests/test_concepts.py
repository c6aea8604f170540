"""Concepts: relations from local co-occurrence, hierarchy, names, galleries (issue #5).

Known answers come from data made here: a planted two-level dictionary whose
children fire only where their parent fires, each atom with a known "text"
vector; children are a parent plus a small residual, so the bare decoder row of
a learned child is an off-manifold residual that the baseline names badly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY

ROOTS = ["boat", "dog", "tree", "car", "house", "bird"]
CHILDREN = [["sailboat", "canoe"], ["puppy", "terrier"], ["palm", "pine"], ["taxi", "truck"], ["barn", "castle"],
            ["parrot", "owl"]]

# Bars for the planted test (measured values are printed; see the report of issue #5).
MIN_ATOMS_LEARNED = 12 / 18
MIN_PRECISION = 0.8
MIN_RECALL_LEARNED = 0.75
MIN_FAMILY_ACCURACY = 0.85


def planted(seed: int = 0, n_images: int = 400, grid: int = 8, dim: int = 32, n_distract: int = 300,
            resid: float = 0.5, p_child: float = 0.5):
    """Patch grids of objects: a root atom over a rectangle, on some objects one of its children on ~70% of it.

    Atoms are orthonormal directions. Text vectors: a root's is its direction; a child's is
    normalise(parent + resid * child residual), what a patch of the child looks like in context.
    300 random unit "distractor" words make the vocabulary realistic.
    """
    rng = np.random.default_rng(seed)
    words, parent = list(ROOTS), [-1] * len(ROOTS)
    for r, kids in enumerate(CHILDREN):
        for w in kids:
            words.append(w)
            parent.append(r)
    n_atoms = len(words)
    q, _ = np.linalg.qr(rng.normal(size=(dim, n_atoms)))
    dirs = q.T.astype(np.float32)
    text = np.stack([dirs[a] if parent[a] < 0 else dirs[parent[a]] + resid * dirs[a] for a in range(n_atoms)])
    distract = rng.normal(size=(n_distract, dim))
    vocab = np.concatenate([text, distract]).astype(np.float32)
    vocab /= np.linalg.norm(vocab, axis=1, keepdims=True)
    vocab_words = words + [f"distractor{i:03d}" for i in range(n_distract)]
    kids_of = {r: [c for c in range(n_atoms) if parent[c] == r] for r in range(len(ROOTS))}
    feats = rng.normal(scale=0.01, size=(n_images, grid, grid, dim)).astype(np.float32)
    for n in range(n_images):
        for _ in range(2):
            r = int(rng.integers(len(ROOTS)))
            h, w = rng.integers(3, 6, size=2)
            y0, x0 = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
            child = int(rng.choice(kids_of[r])) if rng.random() < p_child else None
            for y in range(y0, y0 + h):
                for x in range(x0, x0 + w):
                    feats[n, y, x] += rng.uniform(1, 2) * dirs[r]
                    if child is not None and rng.random() < 0.7:
                        feats[n, y, x] += rng.uniform(0.8, 1.6) * dirs[child]
    pairs = {(a, parent[a]) for a in range(n_atoms) if parent[a] >= 0}
    return {"feats": feats, "dirs": dirs, "parent": parent, "words": words, "vocab": vocab,
            "vocab_words": vocab_words, "pairs": pairs}


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """The planted data, imported as a cache with its vocabulary, and a small SAE trained on it (CPU, ~800 steps)."""
    from insight.cache.importer import import_features
    from insight.config import load_config
    from insight.sae import MatryoshkaSAE, make_optimizer, save_sae, train_step

    work = tmp_path_factory.mktemp("planted")
    data = planted()
    np.save(work / "grids.npy", data["feats"])
    np.save(work / "text.npy", data["vocab"])
    (work / "words.txt").write_text("\n".join(data["vocab_words"]))
    cache = import_features(str(work / "grids.npy"), str(work / "cache"), shard_images=64,
                            text=str(work / "text.npy"), words=str(work / "words.txt"))["cache"]
    cfg = load_config(None, [f"workdir={work}", f"train.cache={cache}", "sae.expansion=1", "sae.k=1",
                             "sae.group_fractions=[0.25, 0.75]", "sae.threshold_start_step=100",
                             "sae.dead_tokens=50000", "sae.aux_k=16", "cache.val_fraction=0"])
    x_nd = torch.from_numpy(data["feats"].reshape(-1, data["feats"].shape[-1]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~20x faster than two contending ones here
    try:
        sae = MatryoshkaSAE.from_config(x_nd.shape[1], cfg.sae, seed=0)
        sae.init_from_batch(x_nd[:4096])
        opt = make_optimizer(sae, 5e-3)
        gen = torch.Generator().manual_seed(0)
        for step in range(800):
            train_step(sae, opt, x_nd[torch.randint(0, len(x_nd), (1024,), generator=gen)], cfg.sae, step)
    finally:
        torch.set_num_threads(threads)
    ckpt = save_sae(work / "model" / "sae", sae, cfg.to_dict(), None, 800)
    return {"data": data, "cfg": cfg, "sae": sae.eval(), "cache": cache, "checkpoint": ckpt, "work": work}


# ------------------------------------------------------------------ hierarchy (pure)


def test_hierarchy_aliases_cycles_reduces_shortcuts_and_levels():
    from insight.concepts.hierarchy import Hierarchy, build_hierarchy

    # 0 root; 1 < 0; 2 < 1 and 2 < 0 (a shortcut); 3 <-> 4 mutual (4 more frequent): aliases;
    # 5 -> 6 -> 7 -> 5 a three-cycle: one alias class (7 most frequent); 9 < 3 one way: under the class {3, 4};
    # 8 never fired but "related".
    parents_all = [[], [(0, 0.9)], [(1, 0.95), (0, 0.9)], [(4, 0.8)], [(3, 0.8)], [(6, 0.9)], [(7, 0.9)],
                   [(5, 0.9)], [(0, 1.0)], [(3, 0.85)]]
    count = np.array([100, 50, 20, 30, 40, 10, 20, 30, 0, 5])
    h = build_hierarchy(parents_all, count)
    assert h.alias_class.tolist() == [0, 1, 2, 4, 4, 7, 7, 7, 8, 9]
    assert h.members(3) == [4, 3] and h.members(6) == [7, 6, 5] and h.n_alias_classes == 2
    assert h.parents == [[], [0], [1], [], [], [], [], [], [], [4]]
    assert h.children[0] == [1] and h.children[1] == [2] and h.children[3] == h.children[4] == [9]
    assert h.level.tolist() == [0, 1, 2, 0, 0, 0, 0, 0, -1, 1]
    assert h.roots == [0, 4, 7] and h.with_parents == 3 and h.levels == 3
    assert h.alias_edges == 5 and h.shortcuts_dropped == 1 and h.dense_edges_dropped == h.uncovered_dropped == 0
    # family naming: one-way relations only (2 keeps its grandparent: Dthr is not reduced), no aliases
    assert h.family[2] == [(1, 0.95), (0, 0.9)] and h.family[3] == [] and h.family[9] == [(3, 0.85)]
    back = Hierarchy.from_json(json.loads(json.dumps(h.to_json())))
    assert back.parents == h.parents and back.children == h.children and back.classes == h.classes
    assert np.array_equal(back.level, h.level) and np.array_equal(back.alias_class, h.alias_class)


def test_dense_concepts_are_flagged_and_nobodys_parent():
    from insight.concepts.hierarchy import build_hierarchy

    # of 1000 tokens: 0 is active on 500 (dense at share 0.3); 2 < 0; 1 < 2 and 1 < 0; 3 <-> 0 aliases
    parents_all = [[(3, 0.8)], [(0, 0.9), (2, 0.8)], [(0, 0.95)], [(0, 0.9)]]
    count = np.array([500, 100, 200, 260])
    h = build_hierarchy(parents_all, count, tokens=1000, dense_share=0.3)
    assert h.dense.tolist() == [True, False, False, False] and h.dense_class.tolist() == [True, False, False, True]
    assert h.parents == [[], [2], [], []] and h.level.tolist() == [0, 1, 0, 0] and h.dense_edges_dropped == 2
    assert h.family[1] == [(2, 0.8)] and h.family[2] == []  # dense concepts stay out of families too
    allowed = build_hierarchy(parents_all, count, tokens=1000, dense_share=0.3, dense_parents=True)
    assert allowed.parents == [[], [2], [0], []] and allowed.level.tolist() == [0, 2, 1, 0]
    assert allowed.family[2] == [(0, 0.95)] and allowed.dense[0]
    none = build_hierarchy(parents_all, count, tokens=1000, dense_share=0.6)
    assert not none.dense.any() and none.parents[2] == [0]


def test_cofiring_block_is_one_alias_class_from_the_real_pass(tmp_path):
    """Codes made here, relations by the streaming pass: a co-firing block, a one-way pair, a dense concept.

    Identity SAE: concept i is feature i. 0-5 fire together on the top right of most images (each drops out
    on 5% of the block's patches, so frequencies differ a little); 7 fires on part of 6's region; 8 covers the
    left 5 of 8 columns everywhere, and 9 fires on a few patches inside it. On 20 more images, a relation
    that is not transitive: 12 lies inside 11 (Dn 1), 11 mostly inside 10 (0.8), but 12 half outside 10.
    """
    from insight.cache import CacheReader
    from insight.cache.importer import import_features
    from insight.concepts.hierarchy import build_hierarchy, raw_parents
    from insight.concepts.stats import partial_stats

    rng = np.random.default_rng(0)
    n, g, dim = 60, 8, 13
    grids = np.zeros((n + 20, g, g, dim), np.float32)
    block = list(range(6))
    for im in range(n):
        if rng.random() < 0.8:
            for y in range(0, 4):
                for x in range(5, 8):
                    for c in block:
                        if rng.random() > 0.05:
                            grids[im, y, x, c] = rng.uniform(1, 2)
        if rng.random() < 0.8:
            grids[im, 4:8, 5:8, 6] = rng.uniform(1, 2, size=(4, 3))
            if rng.random() < 0.5:
                grids[im, 5:7, 6:8, 7] = rng.uniform(1, 2, size=(2, 2))
        grids[im, :, 0:5, 8] = rng.uniform(1, 2, size=(g, 5))
        if rng.random() < 0.5:
            y, x = rng.integers(0, g), rng.integers(0, 4)
            grids[im, y, x : x + 2, 9] = rng.uniform(1, 2, size=2)
    grids[n:, 0:4, :, 10] = 1.5  # 32 patches
    grids[n:, 0:5, 0:4, 11] = 1.5  # 20 patches, 16 of them in 10's
    grids[n:, 3:5, 0:2, 12] = 1.5  # 4 patches, all in 11's, 2 in 10's
    np.save(tmp_path / "g.npy", grids)
    reader = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "c"), shard_images=30)["cache"])
    # the pass's task body over every shard in this process (the Ray fan-out is tested above)
    stats = partial_stats(reader, range(len(reader.manifest.shards)), _identity_sae(dim, threshold=0.25), eps=1e-3,
                          radius=0, top_n=5)
    parents_all = raw_parents(stats, 0.75)
    freq = stats.frequency_m
    assert all(j in dict(parents_all[i]) for i in block for j in block if i != j)  # mutual: Dn > tau both ways
    assert len(set(stats.count_m[block].tolist())) > 1 and freq[8] > 0.4 and freq[block].max() < 0.2

    h = build_hierarchy(parents_all, stats.count_m, tokens=stats.tokens, dense_share=0.3)
    rep = int(np.argmax(stats.count_m[block]))
    assert sorted(h.members(0)) == block and h.alias_class[block].tolist() == [rep] * 6
    assert h.level[block].tolist() == [0] * 6 and h.parents[rep] == [] and h.levels == 2  # no chain of 6
    assert h.parents[7] == [6] and h.children[6] == [7] and h.level[7] == 1 and 7 not in dict(parents_all[6])
    assert h.dense.tolist() == [False] * 8 + [True] + [False] * 4
    assert 8 in dict(parents_all[9]) and h.parents[9] == [] and h.level[9] == 0  # dense: not a parent
    assert h.family[7] == [(6, dict(parents_all[7])[6])] and all(h.family[i] == [] for i in block)
    dn = stats.dn_rows(0, dim)
    assert (dn[11, 10], dn[10, 11], dn[12, 11], dn[12, 10]) == (0.8, 0.5, 1.0, 0.5)
    assert h.parents[11] == [10] and h.parents[12] == [] and h.uncovered_dropped == 1  # under 11 would mean under 10
    assert h.family[12] == [(11, 1.0)]  # the relation itself stays (parents_all, family naming)
    with_dense = build_hierarchy(parents_all, stats.count_m, tokens=stats.tokens, dense_share=0.3,
                                 dense_parents=True)
    assert with_dense.parents[9] == [8] and with_dense.level[9] == 1


def test_rare_concepts_stay_out_of_the_tree_from_the_real_pass(tmp_path):
    """Codes made here, relations by the streaming pass: 0 covers the top half of every image, 1 a corner of
    it; 2 and 3 fire together on 3 patches of one image inside 1 (aliases under 1 if 3 tokens counted)."""
    from insight.cache import CacheReader
    from insight.cache.importer import import_features
    from insight.concepts.hierarchy import Hierarchy, build_hierarchy, raw_parents
    from insight.concepts.stats import partial_stats

    grids = np.zeros((20, 8, 8, 4), np.float32)
    grids[:, 0:4, :, 0] = 1.5
    grids[:, 0:2, 0:4, 1] = 1.5
    for y, x in ((0, 0), (0, 1), (1, 0)):
        grids[0, y, x, 2:4] = 1.5
    np.save(tmp_path / "g.npy", grids)
    reader = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "c"), shard_images=10)["cache"])
    stats = partial_stats(reader, range(len(reader.manifest.shards)), _identity_sae(4, threshold=0.25), eps=1e-3,
                          radius=0, top_n=5)
    assert stats.count_m.tolist() == [640, 160, 3, 3]
    parents_all = raw_parents(stats, 0.75)
    every = build_hierarchy(parents_all, stats.count_m, tokens=stats.tokens)
    assert every.members(2) == [2, 3] and every.parents[2] == [1] and every.levels == 3  # 3 tokens deepen it
    h = build_hierarchy(parents_all, stats.count_m, tokens=stats.tokens, min_support=10)
    assert h.rare.tolist() == [False, False, True, True] and h.members(2) == [2] and h.members(3) == [3]
    assert h.parents[2] == h.parents[3] == [] and h.level.tolist() == [0, 1, -1, -1] and h.levels == 2
    assert h.children[1] == [] and h.roots == [0] and h.rare_edges_dropped == 6
    assert dict(parents_all[2]) == {0: 1.0, 1: 1.0, 3: 1.0}  # the relations themselves stay
    assert h.family[2] == [(0, 1.0), (1, 1.0)]  # family naming: its relations, no rare concept
    doc = json.loads(json.dumps(h.to_json()))
    assert doc["rare"] == [2, 3] and doc["min_support"] == 10 and [c["id"] for c in doc["classes"]] == [0, 1]
    back = Hierarchy.from_json(doc)
    assert back.rare.tolist() == h.rare.tolist() and back.roots == [0] and back.levels == 2


# ------------------------------------------------------------------ the streaming pass


def _identity_sae(dim: int, threshold: float):
    from insight.sae import MatryoshkaSAE

    sae = MatryoshkaSAE(dim, dim, [dim], k=1, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(dim))
        sae.W_dec.copy_(torch.eye(dim))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    return sae.eval()


def test_radius_widens_cooccurrence_exactly_as_expected(ray_local, tmp_path):
    """Identity SAE, one-hot patches on a 4x4 grid: D for radius 0, 1, 2 by hand."""
    from insight.cache import CacheReader
    from insight.cache.importer import import_features
    from insight.concepts.stats import FIXED_SCALE, compute_stats

    a, b, c, d, e = range(5)
    grids = np.zeros((2, 4, 4, 5), np.float32)
    grids[0, 0, 0, a], grids[0, 0, 0, e] = 2.0, 0.5  # a and e on the same patch
    grids[0, 0, 1, b] = 3.0  # right of a
    grids[0, 1, 1, c] = 1.5  # diagonal to a (Chebyshev 1)
    grids[0, 3, 3, d] = 1.0  # Chebyshev 2 from c, 3 from a
    grids[1, 0, 0, d] = 1.0  # another image: never a neighbour of image 0's patches
    grids[1, 3, 3, a] = 0.2  # below the threshold: no activity
    np.save(tmp_path / "g.npy", grids)
    reader = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "c"), shard_images=1)["cache"])
    sae = _identity_sae(5, threshold=0.25)

    def dmat(radius: int) -> np.ndarray:
        st = compute_stats(reader, sae, eps=1e-3, radius=radius, top_n=3, tasks=2)
        return st.cooc_mm / FIXED_SCALE

    expect0 = np.zeros((5, 5))
    for i, v in ((a, 2.0), (b, 3.0), (c, 1.5), (d, 2.0), (e, 0.5)):
        expect0[i, i] = v
    expect0[a, e], expect0[e, a] = 2.0, 0.5
    d0, d1, d2 = dmat(0), dmat(1), dmat(2)
    np.testing.assert_array_equal(d0, expect0)
    expect1 = expect0.copy()
    for i, v in ((a, 2.0), (e, 0.5), (b, 3.0), (c, 1.5)):  # a, e, b, c are all within 1 of each other
        for j in (a, e, b, c):
            expect1[i, j] = v
    np.testing.assert_array_equal(d1, expect1)
    expect2 = expect1.copy()
    expect2[c, d], expect2[d, c] = 1.5, 1.0  # c at (1,1) and d at (3,3): Chebyshev distance 2
    np.testing.assert_array_equal(d2, expect2)
    assert (d1 >= d0).all() and (d2 >= d1).all() and np.array_equal(np.diag(d0), np.diag(d2))


def test_pass_is_identical_over_one_shard_or_many(ray_local, planted_model, tmp_path):
    from insight.cache import CacheReader
    from insight.cache.importer import import_features
    from insight.concepts.stats import compute_stats

    feats = planted_model["data"]["feats"][:60]
    np.save(tmp_path / "g.npy", feats)
    one = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "one"), shard_images=60)["cache"])
    many = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "many"), shard_images=7)["cache"])
    assert len(one.manifest.shards) == 1 and len(many.manifest.shards) == 9
    sae = planted_model["sae"]
    for radius in (0, 1):
        s1 = compute_stats(one, sae, eps=1e-3, radius=radius, top_n=5, tasks=1, map_top=3)
        sn = compute_stats(many, sae, eps=1e-3, radius=radius, top_n=5, tasks=3, map_top=3)
        assert s1.tokens == sn.tokens == 60 * 64
        assert np.array_equal(s1.cooc_mm, sn.cooc_mm) and np.array_equal(s1.count_m, sn.count_m)
        assert np.array_equal(s1.top_key_mn, sn.top_key_mn) and np.array_equal(s1.top_val_mn, sn.top_val_mn)
        for x, y in zip(s1.mean_vectors(), sn.mean_vectors(), strict=True):
            assert np.array_equal(x, y)
        assert [s1.top_patches(i) for i in range(sae.n_concepts)] == [sn.top_patches(i) for i in range(sae.n_concepts)]
        assert s1.cooc_mm.any() and (s1.count_m > 0).sum() > 10
        for i in np.nonzero(s1.count_m)[0]:
            for rank, (_, row, col, act) in enumerate(s1.top_patches(i)[:3]):
                map_hw = s1.top_map(i, rank)
                assert np.array_equal(map_hw, sn.top_map(i, rank)) and map_hw.shape == (8, 8)
                assert map_hw[row, col] == pytest.approx(act, rel=1e-3)  # the map is the concept's, on that image


def test_pass_equals_the_dense_formula_in_every_encoding_mode(tmp_path):
    """partial_stats against D = (z * A)^T N, counts, top tables and maps computed densely here.

    Dyadic weights and features make every code exact in float32, so the sparse fixed-point pass must match
    bit for bit: per-token top-k (theta < 0), theta below eps (codes in (0, eps] are in the maps but not
    active), a learned theta; radius 0 and 1; a concept that never fires, an image where nothing fires,
    chunks of two images across shards of four, and a split that keeps no image.
    """
    from insight.cache import CacheReader
    from insight.cache.importer import import_features
    from insight.concepts.stats import FIXED_SCALE, encode_tokens, partial_stats
    from insight.sae import MatryoshkaSAE

    rng = np.random.default_rng(3)
    n, g, dim, m, top_n = 7, 4, 8, 12, 4
    grids = rng.integers(-8, 9, size=(n, g, g, dim)).astype(np.float32) / 4
    grids[2] = 0.0  # nothing fires on this image (zero features, zero biases)
    np.save(tmp_path / "g.npy", grids)
    reader = CacheReader(import_features(str(tmp_path / "g.npy"), str(tmp_path / "c"), shard_images=4)["cache"])
    sae = MatryoshkaSAE(dim, m, [m], k=3, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(dim, m)).astype(np.float32)))
        sae.W_enc[:, m - 1] = 0.0  # concept m-1 never fires: its pre-activation is 0
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.eval()
    x = torch.from_numpy(grids)
    for theta, eps in ((-1.0, 1e-3), (0.0, 0.75), (1.5, 1e-3)):
        sae.threshold.fill_(theta)
        with torch.no_grad():
            z = torch.stack([encode_tokens(sae, x[i].reshape(g * g, dim)) for i in range(n)]).reshape(n, g, g, m)
        act = z > eps
        assert act[2].sum() == 0 and act[..., m - 1].sum() == 0 and act.sum() > 0
        if theta == 0.0:
            assert ((z > 0) & ~act).any()  # codes under the activity floor
        for radius in (0, 1):
            nb = torch.nn.functional.max_pool2d(act.permute(0, 3, 1, 2).double(), 2 * radius + 1, 1, radius)
            dense = torch.einsum("bhwi,bjhw->ij", (z * act).double(), nb).numpy()
            st = partial_stats(reader, range(len(reader.manifest.shards)), sae, eps=eps, radius=radius,
                               top_n=top_n, map_top=2, chunk_tokens=2 * g * g)
            assert st.tokens == n * g * g and st.images == n
            np.testing.assert_array_equal(st.cooc_mm / FIXED_SCALE, dense)
            np.testing.assert_array_equal(st.count_m, act.sum((0, 1, 2)).numpy())
            for i in range(m):
                vals = np.sort(z[..., i][act[..., i]].numpy())[::-1][:top_n]
                tops = st.top_patches(i)
                assert [v for *_, v in tops] == vals.tolist()
                for rank, (image_id, row, col, v) in enumerate(tops[:2]):  # the importer's ids: the row number
                    assert z[int(image_id), row, col, i] == v
                    np.testing.assert_array_equal(st.top_map(i, rank), z[int(image_id), :, :, i].numpy().astype(np.float16))
            assert st.top_patches(m - 1) == [] and not st.dn_rows(m - 1, m).any()
    none = partial_stats(reader, range(len(reader.manifest.shards)), sae, eps=1e-3, radius=1, top_n=top_n,
                         split="val", val_fraction=0.0)
    assert none.tokens == 0 and not none.cooc_mm.any() and not none.count_m.any() and none.top_patches(0) == []


# ------------------------------------------------------------------ the planted hierarchy, end to end


def test_planted_parents_and_names_are_recovered(ray_local, planted_model):
    from insight.concepts.run import mine_concepts
    from insight.config import load_config
    from insight.models import load_model

    work, data = planted_model["work"], planted_model["data"]
    cfg = load_config(None, [f"workdir={work}", "concepts.gallery_per_group=2", "concepts.tree_depth=2"])
    out = mine_concepts(cfg, str(planted_model["checkpoint"]))
    assert out["vocabulary_source"] == "cache" and out["vocabulary"] == len(data["vocab_words"])
    table = load_model(str(planted_model["checkpoint"])).concepts
    assert len(table) == planted_model["sae"].n_concepts and table.meta["tau"] == 0.75

    w_dec = planted_model["sae"].W_dec.detach().numpy()
    cos = w_dec @ data["dirs"].T
    atom, best = cos.argmax(1), cos.max(1)
    good = {c.id for c in table if c.alive and best[c.id] > 0.9}
    learned_atoms = {int(atom[i]) for i in good}
    edges = {(int(atom[c]), int(atom[p])) for c in good for p in table[c].parents if p in good and atom[p] != atom[c]}
    learnable = {(a, p) for a, p in data["pairs"] if a in learned_atoms and p in learned_atoms}
    hits = edges & data["pairs"]
    precision = len(hits) / max(1, len(edges))
    recall_learned = len(hits & learnable) / max(1, len(learnable))
    recall_all = len(hits) / len(data["pairs"])

    words, parent = data["words"], data["parent"]

    def accuracy(column: str, kind: str) -> float:
        ids = [i for i in good if kind == "all" or (parent[atom[i]] >= 0) == (kind == "child")]
        return float(np.mean([getattr(table[i], column) == words[atom[i]] for i in ids])) if ids else float("nan")

    acc = {f"{m}_{k}": accuracy(f"name_{m}", k) for m in ("family", "decoder") for k in ("all", "root", "child")}
    report = {"atoms_learned": len(learned_atoms), "atoms": len(words), "edges": len(edges), "precision": precision,
              "recall_learned": recall_learned, "recall_all": recall_all, **acc}
    print("planted:", json.dumps(report))

    assert len(learned_atoms) >= MIN_ATOMS_LEARNED * len(words), report
    assert precision >= MIN_PRECISION and recall_learned >= MIN_RECALL_LEARNED, report
    assert acc["family_all"] >= MIN_FAMILY_ACCURACY, report
    assert acc["family_child"] >= acc["decoder_child"] and acc["family_child"] >= 0.8, report
    assert acc["decoder_root"] >= 0.8, report  # the baseline is fine where rows are not residuals
    # both names are stored, the configured one is the final name
    assert all(c.name == c.name_family and c.naming == "family" and len(c.candidates) == 5 for c in table)
    child = next(i for i in good if parent[atom[i]] >= 0 and table[i].parents)
    assert table[child].level >= 1 and table[child].top_patches and table[child].top_patches[0].activation > 0
    # hierarchy.json and the table tell the same alias classes, levels and dense tags
    from insight.concepts.hierarchy import Hierarchy

    hier = Hierarchy.load(Path(out["hierarchy"]))
    assert hier.levels == out["levels"] and hier.n_alias_classes == table.n_alias_classes == out["alias_classes"]
    for c in table:
        assert (c.alias_class, c.level, c.dense) == (hier.alias_class[c.id], hier.level[c.id], hier.dense[c.id])
        assert all(a.level == c.level and a.parents == c.parents for a in table.alias_members(c.id))
    # imported cache: galleries fall back to heatmaps on the patch grid
    gal = Path(out["galleries"])
    assert sorted(p.name for p in gal.glob("concept-*.png")) and (gal / "contact_levels.png").stat().st_size > 0


# ------------------------------------------------------------------ vocabulary


def test_wordfreq_vocabulary_filter_and_embedding_cache(tmp_path):
    from insight.concepts.vocabulary import STOPWORDS, embed_vocabulary, wordfreq_words
    from insight.config import load_config

    words = wordfreq_words(3000)
    assert len(words) == 3000 == len(set(words))
    assert all(w.isalpha() and w.isascii() and len(w) >= 3 and w not in STOPWORDS for w in words)
    assert {"family", "house", "water"} <= set(words)  # -ly words whose stem is not a word stay
    assert not {"quickly", "usually", "the", "and"} & set(words)  # adverbs of listed stems, stopwords go
    cfg = load_config(TINY, [f"workdir={tmp_path}"])
    first = embed_vocabulary(cfg.backbone, words[:50], tmp_path / "vocab")
    files = list((tmp_path / "vocab").glob("vocab-*.safetensors"))
    assert len(files) == 1 and first.text_vd.shape == (50, 64)
    stamp = files[0].stat().st_mtime_ns
    again = embed_vocabulary(cfg.backbone, words[:50], tmp_path / "vocab")
    assert files[0].stat().st_mtime_ns == stamp and np.array_equal(first.text_vd, again.text_vd)
    assert np.allclose(np.linalg.norm(again.text_vd, axis=1), 1, atol=1e-5)


# ------------------------------------------------------------------ the CLI on the tiny pipeline


def test_concepts_cli_end_to_end(tiny_cache, tiny_champion, tmp_path):
    import mlflow
    import ray

    from insight.models import load_model

    _, extracted = tiny_cache
    run_id = tiny_champion.other_trials()[0]  # a real sweep trial (the probe test takes the last); no train.cache below: the step finds it by its tag
    uri = tiny_champion.tracking_uri  # the sweep's store; this test's outputs go to its own workdir
    # the step joins the test's running Ray cluster (as it would join a real one) instead of starting its own
    address = ray.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "insight.cli", "concepts", "--model", run_id, "--config", str(TINY),
            "--set", f"workdir={tmp_path}", "--set", "concepts.gallery_per_group=3", "--set",
            "concepts.min_support=25", "--set", f"cluster.address={address}",  # tiny.yaml turns the rare rule off
            "--set", f"tracking.uri={uri}"]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print("e2e: concepts", round(out["wall_s"], 1), "s", {k: round(v, 1) for k, v in out["timings"].items()})
    assert out["ok"] and out["concepts"] == 64 * 4 and isinstance(out["with_parents"], int)
    for key in ("table", "table_json", "relations", "hierarchy", "hierarchy_png", "hierarchy_html", "contact_sheet"):
        assert Path(out[key]).stat().st_size > 0, key
    galleries = list(Path(out["galleries"]).glob("concept-*.png"))
    assert all(g.stat().st_size > 1000 for g in galleries)
    html = Path(out["hierarchy_html"]).read_text()
    assert "<script" in html and "http://" not in html and "https://" not in html  # no CDN: works offline

    client = mlflow.MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(run_id, "concepts")}
    assert {"concepts/concepts.parquet", "concepts/concepts.json", "concepts/hierarchy.png",
            "concepts/galleries"} <= arts
    assert client.get_run(run_id).data.tags["insight.concepts_run_id"] == out["run_id"]
    assert out["cache"] == extracted["cache"]
    table = load_model(run_id, tracking_uri=uri, dst=str(tmp_path / "loaded")).concepts
    assert len(galleries) == 3 * len({c.group for c in table})  # concepts.gallery_per_group in every group
    assert len(table) == 256 and table.with_parents == out["with_parents"]
    assert table.n_alias_classes == out["alias_classes"] and sum(c.dense for c in table) == out["dense"]
    assert all(table[c.alias_class].is_representative and c.id in {a.id for a in table.alias_members(c.id)}
               for c in table)
    assert table.meta["model_run_id"] == run_id and table.meta["tokens"] == out["tokens"]
    top = max(table, key=lambda c: c.frequency)
    assert table.by_name(top.name) and top in table.in_group(top.group) and top in table.at_level(top.level)
    assert top.top_patches and 0 <= top.top_patches[0].row < 7
    # the interactive tree shows the table's distinct labels, and rare concepts (if any) sit outside it
    data = json.loads(html.split("id='data'>", 1)[1].split("</script>", 1)[0])
    assert data["nodes"] and all(n["n"] == table.label(n["i"]).removesuffix(f" #{n['i']}") for n in data["nodes"])
    rare = {c.id for c in table if 0 < c.count < table.meta["min_support"]}
    assert out["rare"] == len(rare) > 0 and not rare & set(data["roots"]) and all(table[i].level == -1 for i in rare)
    assert all(not c.parents and not c.children and not c.aliases for c in table if c.id in rare)
