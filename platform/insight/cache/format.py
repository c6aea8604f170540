"""The activation cache format: immutable Parquet shards plus a JSON manifest.

Layout under ``<root>/<key>/`` (``key`` = hash of what made the features):

    manifest.json            written last; its presence means "complete"
    shards/shard-00000.parquet
    shards/shard-00000.json  sidecar written after its shard; lets a resumed
                             extraction skip finished shards

Each shard row is one image (or augmented view): ``image_id`` (string),
``index`` (int64, position in the extraction order) and ``features``, a
fixed-size list of H*W*D float32/float16 values in (H, W, D) order. One row per
image keeps the patch grid together (neighbourhood statistics need it), reads
into NumPy without copies, and streams through Ray Data's Parquet reader.
Every file is written to a temporary name and renamed, so a reader never sees
half a shard. The manifest carries a sha256 per shard; readers verify it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """A cache that is missing, corrupt or not what the caller expected."""


# ------------------------------------------------------------------ filesystem


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any pyarrow URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a unique temp name beside ``path``, then rename over it."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def content_key(identity: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able identity dict (the cache address)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ manifest


@dataclass
class ShardInfo:
    name: str  # file name under shards/
    images: int
    tokens: int
    sha256: str
    bytes: int
    first_index: int = 0


@dataclass
class Manifest:
    key: str
    grid: tuple[int, int]
    dim: int
    dtype: str
    identity: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # image id -> reason
    text: dict[str, Any] | None = None  # optional vocabulary embeddings (file, words)
    version: int = FORMAT_VERSION

    @property
    def num_images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d["num_images"] = self.num_images
        d["num_tokens"] = self.num_tokens
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            d.pop("num_images", None)
            d.pop("num_tokens", None)
            d["grid"] = tuple(d["grid"])
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            if d.get("version") != FORMAT_VERSION:
                raise CacheError(f"{where}: format version {d.get('version')} != {FORMAT_VERSION}")
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CacheError(f"{where} is not a valid cache manifest: {exc}") from exc


# ------------------------------------------------------------------ shards


def encode_shard(ids: list[str], indices: list[int], feats_nhwd: np.ndarray, dtype: str) -> bytes:
    n = feats_nhwd.shape[0]
    flat = np.ascontiguousarray(feats_nhwd.reshape(n, -1), dtype=np.dtype(dtype))
    values = pa.array(flat.reshape(-1))
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "index": pa.array(indices, pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(values, flat.shape[1]),
    })
    sink = io.BytesIO()
    # Float features neither compress nor dictionary-encode (a dictionary attempt
    # costs 11% more bytes at D=512); plain pages keep the file at ~4 B/value.
    pq.write_table(table, sink, compression="none", use_dictionary=["image_id"], write_statistics=False,
                   row_group_size=max(1, n))
    return sink.getvalue()


def decode_shard(data: bytes, grid: tuple[int, int], dim: int, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> (image ids, indices (n,), features (n, H, W, D) in the stored dtype)."""
    try:
        table = pq.read_table(pa.BufferReader(data))
        ids = table.column("image_id").to_pylist()
        idx = table.column("index").to_numpy()
        col = table.column("features").combine_chunks()
        feats = col.flatten().to_numpy(zero_copy_only=False)
    except (pa.ArrowException, KeyError, OSError) as exc:
        raise CacheError(f"shard {where} is corrupt: {exc}") from exc
    n = len(ids)
    expected = n * grid[0] * grid[1] * dim
    if feats.size != expected:
        raise CacheError(f"shard {where} holds {feats.size} values, expected {expected}")
    return ids, idx, feats.reshape(n, grid[0], grid[1], dim)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a local file, read in chunks: the identity of weights, heads and imported features."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_validation(image_id: str, val_fraction: float) -> bool:
    """Deterministic held-out split by image (all views of an image go together)."""
    if val_fraction <= 0:
        return False
    base = image_id.split("#", 1)[0]
    return (zlib.crc32(base.encode()) % 10_000) < val_fraction * 10_000


# ------------------------------------------------------------------ reader


class CacheReader:
    """Read a finished cache: manifest, verified shards, images, tokens, Ray Datasets."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self.fs, self.path = resolve_fs(self.location)
        mpath = join(self.path, "manifest.json")
        if not exists(self.fs, mpath):
            raise CacheError(
                f"no cache at {self.location}: manifest.json is missing (the extraction did not finish?)"
            )
        self.manifest = Manifest.from_json(read_bytes(self.fs, mpath).decode(), where=f"{self.location}/manifest.json")

    @property
    def key(self) -> str:
        return self.manifest.key

    def shard_path(self, info: ShardInfo) -> str:
        return join(self.path, "shards", info.name)

    def read_shard(self, info: ShardInfo, verify: bool = True) -> tuple[list[str], np.ndarray]:
        path = self.shard_path(info)
        where = f"{self.location}/shards/{info.name}"
        if not exists(self.fs, path):
            raise CacheError(f"shard {where} is missing")
        data = read_bytes(self.fs, path)
        if verify and sha256(data) != info.sha256:
            raise CacheError(f"shard {where} is corrupt: checksum mismatch")
        ids, _, feats = decode_shard(data, self.manifest.grid, self.manifest.dim, where)
        return ids, feats

    def iter_images(self, split: str | None = None, val_fraction: float = 0.0) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (image id, features (H, W, D) float32), optionally one split only."""
        for info in self.manifest.shards:
            ids, feats = self.read_shard(info)
            for i, image_id in enumerate(ids):
                if split is not None and (split == "val") != is_validation(image_id, val_fraction):
                    continue
                yield image_id, feats[i].astype(np.float32, copy=False)

    def iter_tokens(self, batch_size: int, split: str | None = None, val_fraction: float = 0.0,
                    shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
        """Yield (batch_size, D) float32 token batches (the last one may be smaller)."""
        rng = np.random.default_rng(seed)
        order = list(range(len(self.manifest.shards)))
        if shuffle:
            rng.shuffle(order)
        buf: list[np.ndarray] = []
        have = 0
        for s in order:
            ids, feats = self.read_shard(self.manifest.shards[s])
            keep = [i for i, x in enumerate(ids)
                    if split is None or (split == "val") == is_validation(x, val_fraction)]
            if not keep:
                continue
            toks = feats[keep].reshape(-1, self.manifest.dim).astype(np.float32)
            if shuffle:
                toks = toks[rng.permutation(len(toks))]
            buf.append(toks)
            have += len(toks)
            while have >= batch_size:
                cat = np.concatenate(buf)
                yield cat[:batch_size]
                buf, have = [cat[batch_size:]], len(cat) - batch_size
        if have:
            yield np.concatenate(buf)

    def to_ray_dataset(self, split: str | None = None, val_fraction: float = 0.0, num_cpus: float = 0.5):
        """A Ray Dataset of patch tokens: one row per token, column ``x`` (D,) float32.

        Read and reshape tasks ask for ``num_cpus`` each (default half a CPU) so
        they can run beside training workers that hold most of a node's CPUs.
        """
        import ray.data

        paths = [self.shard_path(s) for s in self.manifest.shards]
        grid, dim = self.manifest.grid, self.manifest.dim
        ds = ray.data.read_parquet(paths, filesystem=self.fs, ray_remote_args={"num_cpus": num_cpus})
        ds = ds.select_columns(["image_id", "features"])

        def to_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ids = batch["image_id"]
            feats = np.stack(list(batch["features"])) if batch["features"].dtype == object else batch["features"]
            feats = np.asarray(feats).reshape(len(ids), grid[0] * grid[1], dim)
            if split is not None:
                mask = np.array([(split == "val") == is_validation(str(x), val_fraction) for x in ids], dtype=bool)
                feats = feats[mask]
            return {"x": feats.reshape(-1, dim).astype(np.float32)}

        return ds.map_batches(to_tokens, batch_format="numpy", num_cpus=num_cpus)

    def text_embeddings(self) -> tuple[list[str], np.ndarray] | None:
        """Vocabulary embeddings imported with the features, if any."""
        if not self.manifest.text:
            return None
        from safetensors.numpy import load as st_load

        data = read_bytes(self.fs, join(self.path, self.manifest.text["file"]))
        return list(self.manifest.text["words"]), st_load(data)["text"]
