"""The activation cache: extraction counts, idempotence, resume, corruption, import, readers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from insight.cache import CacheError, CacheReader, is_validation
from insight.cache.extract import extract
from insight.cache.importer import import_features


def test_extract_counts_and_idempotence(tiny_cache):
    cfg, result = tiny_cache
    reader = CacheReader(result["cache"])
    m = reader.manifest
    assert result["new_shards"] == len(m.shards) > 1
    assert m.grid == (7, 7) and m.dim == 64
    assert m.num_images == result["images"] == 25 * cfg.data.views
    assert m.num_tokens == m.num_images * 49 == result["tokens"]
    ids = [i for i, _ in reader.iter_images()]
    assert len(ids) == len(set(ids)) == m.num_images and "chelsea#v3" in ids
    again = extract(cfg, progress=False)
    assert again["new_shards"] == 0 and again["key"] == result["key"] and again["tokens"] == result["tokens"]


def test_cache_key_follows_what_made_it(tiny_cache, tiny_cfg):
    from insight.backbones import build_backbone
    from insight.cache.extract import cache_identity
    from insight.cache.format import content_key
    from insight.data import build_dataset

    cfg, result = tiny_cache
    ds = build_dataset(cfg.data, cfg.workdir)
    bb = build_backbone(cfg.backbone, device="cpu")
    base = content_key(cache_identity(cfg, bb.identity(), ds.identity()))
    assert base == result["key"]
    half = tiny_cfg("cache.dtype=float16")
    assert content_key(cache_identity(half, bb.identity(), ds.identity())) != base
    seeded = build_backbone(tiny_cfg("backbone.seed=7").backbone, device="cpu")
    assert content_key(cache_identity(cfg, seeded.identity(), ds.identity())) != base


def test_interrupted_extraction_resumes(tiny_cfg, ray_local, tmp_path):
    cfg = tiny_cfg("data.max_images=6", "data.views=2", "cache.shard_images=4", "cache.dtype=float16")
    first = extract(cfg, progress=False)
    loc = Path(first["cache"])
    before = {p.name: p.stat().st_mtime_ns for p in (loc / "shards").glob("*.parquet")}
    assert len(before) == 3
    names = [s.name for s in CacheReader(str(loc)).manifest.shards]
    assert sorted(names) == sorted(before) and [n[:12] for n in names] == [f"shard-{i:05d}-" for i in range(3)]
    # Simulate a crash: the manifest never got written, one shard is lost, and another was written
    # twice (a replica on a lost node and its retry): its orphaned twin must not survive completion.
    os.remove(loc / "manifest.json")
    os.remove(loc / "shards" / names[1])
    twin = loc / "shards" / "shard-00002-000000000000.parquet"
    twin.write_bytes((loc / "shards" / names[2]).read_bytes()[:100])
    second = extract(cfg, progress=False)
    assert second["new_shards"] == 1 and second["tokens"] == first["tokens"] == 12 * 49
    after = {p.name: p.stat().st_mtime_ns for p in (loc / "shards").glob("*.parquet")}
    assert after[names[0]] == before[names[0]] and not twin.exists() and len(after) == 3
    reader = CacheReader(str(loc))
    assert reader.manifest.dtype == "float16"
    assert not list((loc / "shards").glob(".tmp-*"))


def test_corrupt_and_missing_shards_are_named(tmp_path):
    arr = np.random.default_rng(0).standard_normal((10, 2, 3, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", arr)
    res = import_features(str(tmp_path / "f.npy"), str(tmp_path / "cache"), shard_images=4)
    loc = Path(res["cache"])
    shard = loc / "shards" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(str(loc))
    with pytest.raises(CacheError, match="shard-00001.parquet is corrupt"):
        list(reader.iter_images())
    os.remove(shard)
    with pytest.raises(CacheError, match="shard-00001.parquet is missing"):
        list(reader.iter_images())
    with pytest.raises(CacheError, match="no such folder: .*nothing.*insight extract"):
        CacheReader(str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(CacheError, match="manifest.json is missing.*rerun `insight extract`"):
        CacheReader(str(tmp_path / "half"))
    # the folder above a cache: say so and list the caches under it
    with pytest.raises(CacheError, match=rf"is a cache root, not a cache; caches under it: {loc.name}"):
        CacheReader(str(loc.parent))


def test_import_round_trip_with_text(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.standard_normal((9, 3, 3, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", arr)
    (tmp_path / "ids.txt").write_text("\n".join(f"img{i}" for i in range(9)))
    text = rng.standard_normal((4, 8)).astype(np.float32)
    np.save(tmp_path / "t.npy", text)
    (tmp_path / "w.txt").write_text("cat\ndog\ncup\nsky\n")
    res = import_features(str(tmp_path / "f.npy"), str(tmp_path / "c"), ids=str(tmp_path / "ids.txt"),
                          shard_images=4, text=str(tmp_path / "t.npy"), words=str(tmp_path / "w.txt"))
    reader = CacheReader(res["cache"])
    got = dict(reader.iter_images())
    np.testing.assert_array_equal(got["img5"], arr[5])
    words, vecs = reader.text_embeddings()
    assert words == ["cat", "dog", "cup", "sky"]
    np.testing.assert_array_equal(vecs, text)
    again = import_features(str(tmp_path / "f.npy"), str(tmp_path / "c"), ids=str(tmp_path / "ids.txt"),
                            shard_images=4, text=str(tmp_path / "t.npy"), words=str(tmp_path / "w.txt"))
    assert again["new_shards"] == 0
    toks = np.concatenate(list(reader.iter_tokens(batch_size=7)))
    assert toks.shape == (81, 8)


def test_shuffled_tokens_mix_shards_and_cover_the_split_once(tmp_path):
    """Batches drawn one shard at a time are a few images' views each; the shuffle pool mixes shards."""
    arr = np.repeat(np.arange(40, dtype=np.float32), 4 * 2).reshape(40, 2, 2, 2)  # token value = its image
    np.save(tmp_path / "f.npy", arr)
    reader = CacheReader(import_features(str(tmp_path / "f.npy"), str(tmp_path / "c"), shard_images=10)["cache"])
    image_of = {img: n for n, (img, _) in enumerate(reader.iter_images())}
    shard_of_value = {float(v[0, 0, 0]): image_of[img] // 10 for img, v in reader.iter_images()}

    def shards_per_batch(**kw):
        batches = list(reader.iter_tokens(8, shuffle=True, seed=3, **kw))
        values = np.concatenate(batches)[:, 0]
        assert sorted(values.tolist()) == sorted(arr[..., 0].ravel().tolist())  # every token exactly once
        return [len({shard_of_value[float(v)] for v in b[:, 0]}) for b in batches]

    assert shards_per_batch() == [1] * 20  # without a pool: each batch is one shard's (4 shards of 40 tokens)
    mixed = shards_per_batch(shuffle_buffer=10_000)  # a pool larger than the cache: shuffled whole
    assert min(mixed) >= 2 and np.mean(mixed) >= 3, mixed


def test_import_rejects_bad_input(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(CacheError, match=r"\(N, H, W, D\)"):
        import_features(str(tmp_path / "flat.npy"), str(tmp_path / "c"))
    np.save(tmp_path / "g.npy", np.zeros((2, 1, 1, 4), np.float32))
    (tmp_path / "ids.txt").write_text("a\n")
    with pytest.raises(CacheError, match="1 ids for 2"):
        import_features(str(tmp_path / "g.npy"), str(tmp_path / "c"), ids=str(tmp_path / "ids.txt"))


def test_validation_split_holds_out_whole_images(tiny_cache):
    cfg, result = tiny_cache
    reader = CacheReader(result["cache"])
    frac = cfg.cache.val_fraction
    val = {i.split("#")[0] for i, _ in reader.iter_images("val", frac)}
    train = {i.split("#")[0] for i, _ in reader.iter_images("train", frac)}
    assert val and train and not (val & train)
    assert all(is_validation(i, frac) for i in val)


def test_ray_dataset_reader_streams_tokens(tiny_cache):
    cfg, result = tiny_cache
    reader = CacheReader(result["cache"])
    ds = reader.to_ray_dataset(split="train", val_fraction=cfg.cache.val_fraction)
    n = 0
    for batch in ds.iter_batches(batch_size=500, batch_format="numpy"):
        assert batch["x"].shape[1] == 64 and batch["x"].dtype == np.float32
        n += len(batch["x"])
    local = sum(len(t) for t in reader.iter_tokens(1000, "train", cfg.cache.val_fraction))
    assert n == local > 0


def test_manifest_is_plain_json(tiny_cache):
    _, result = tiny_cache
    m = json.loads((Path(result["cache"]) / "manifest.json").read_text())
    assert m["num_tokens"] == result["tokens"] and all(len(s["sha256"]) == 64 for s in m["shards"])


def test_shards_hold_the_backbones_features_and_stage_times(tiny_cache):
    """What the pipelined replica wrote (two shards in flight, next batch prepared on a helper thread,
    forward output copied once into the stored dtype) is what the backbone gives for those pixels."""
    import torch

    from insight.backbones import build_backbone
    from insight.data import build_dataset
    from insight.data.datasets import load_image
    from insight.data.transforms import Preprocessor

    cfg, result = tiny_cache
    reader = CacheReader(result["cache"])
    got = dict(reader.iter_images())
    bb = build_backbone(cfg.backbone, device="cpu")
    pre = Preprocessor(bb.image_size, bb.mean, bb.std, cfg.data.augment)
    rec = {r.image_id: r for r in build_dataset(cfg.data, cfg.workdir).records}["chelsea"]
    rgb, _ = load_image(rec.path)
    x = torch.from_numpy(np.stack([pre(rgb, "chelsea", v) for v in (0, 3)]))
    want = bb.encode_patches(x).numpy()
    np.testing.assert_allclose(got["chelsea"], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["chelsea#v3"], want[1], rtol=1e-4, atol=1e-5)
    for side in (Path(result["cache"]) / "shards").glob("*.json"):
        s = json.loads(side.read_text())
        assert s["stages"]["forward"] > 0 and s["stages"]["decode"] > 0 and s["stages"]["write"] > 0
        assert s["span"][1] >= s["span"][0] and s["replica"]
