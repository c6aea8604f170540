"""`insight cache import`: features computed elsewhere -> a cache like any other.

Input is a NumPy array of patch grids (N, H, W, D) (``.npy``, memory-mapped so it
may be larger than RAM), optional image ids (a text file, one per line, or a
``.npy`` of strings), and optional vocabulary text embeddings (``.npy`` (V, D)
with a words file) for encoders whose text side lives elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from insight.cache.format import (
    CacheError,
    Manifest,
    ShardInfo,
    atomic_write,
    content_key,
    encode_shard,
    exists,
    file_sha256,
    join,
    resolve_fs,
    sha256,
)


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if p.suffix == ".npy":
        return [str(x) for x in np.load(p, allow_pickle=False)]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def import_features(features: str, root: str, ids: str | None = None, dtype: str = "float32",
                    shard_images: int = 64, text: str | None = None, words: str | None = None,
                    name: str | None = None) -> dict[str, Any]:
    fpath = Path(features)
    if not fpath.is_file():
        raise CacheError(f"--features: no file at {fpath}")
    try:
        arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise CacheError(f"--features: {fpath} is not a NumPy .npy array: {exc}") from exc
    if arr.ndim != 4:
        raise CacheError(f"--features: expected patch grids (N, H, W, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise CacheError(f"--features: expected a float array, got {arr.dtype}")
    n, h, w, d = arr.shape
    image_ids = _read_lines(ids) if ids else [f"{i:08d}" for i in range(n)]
    if len(image_ids) != n:
        raise CacheError(f"--ids lists {len(image_ids)} ids for {n} feature grids")
    if len(set(image_ids)) != n:
        raise CacheError("--ids has duplicate ids")
    identity: dict[str, Any] = {"kind": "import", "features_sha256": file_sha256(fpath), "name": name,
                                "ids": content_key({"ids": image_ids}), "dtype": dtype,
                                "shard_images": shard_images}
    text_vecs = None
    if text:
        if not words:
            raise CacheError("--text needs --words (one word per row of the text array)")
        text_vecs = np.load(text, allow_pickle=False).astype(np.float32)
        vocab = _read_lines(words)
        if text_vecs.ndim != 2 or text_vecs.shape[1] != d:
            raise CacheError(f"--text must be (V, {d}) to match the features, got {text_vecs.shape}")
        if len(vocab) != text_vecs.shape[0]:
            raise CacheError(f"--words lists {len(vocab)} words for {text_vecs.shape[0]} text vectors")
        identity["text_sha256"] = file_sha256(text)
    key = content_key(identity)
    location = join(root, key)
    fs, path = resolve_fs(location)
    if exists(fs, join(path, "manifest.json")):
        return {"cache": location, "key": key, "new_shards": 0, "images": n, "tokens": n * h * w,
                "status": "complete (nothing to do)"}
    manifest = Manifest(key=key, grid=(h, w), dim=d, dtype=dtype, identity=identity)
    for s, start in enumerate(range(0, n, shard_images)):
        stop = min(n, start + shard_images)
        data = encode_shard(image_ids[start:stop], list(range(start, stop)), np.asarray(arr[start:stop]), dtype)
        shard = f"shard-{s:05d}.parquet"
        atomic_write(fs, join(path, "shards", shard), data)
        manifest.shards.append(ShardInfo(shard, stop - start, (stop - start) * h * w, sha256(data), len(data), start))
    if text_vecs is not None:
        from safetensors.numpy import save as st_save

        atomic_write(fs, join(path, "text.safetensors"), st_save({"text": text_vecs}))
        manifest.text = {"file": "text.safetensors", "words": vocab}
    atomic_write(fs, join(path, "manifest.json"), manifest.to_json().encode())
    return {"cache": location, "key": key, "new_shards": len(manifest.shards), "images": n,
            "tokens": n * h * w, "grid": [h, w], "dim": d, "status": "written"}
