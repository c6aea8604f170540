"""The activation cache format: immutable Parquet shards plus a JSON manifest.

Layout under ``<root>/<key>/`` (``key`` = hash of what made the features):

    manifest.json            written last; its presence means "complete"
    shards/shard-00000-<sha>.parquet  the file names its content (extraction; imported
                                      caches use shard-00000.parquet); the manifest names each
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
import json
import os
import re
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """A cache that is missing, corrupt or not what the caller expected."""


REBUILD_HINT = "delete the cache folder and rerun `insight extract` (or `insight cache import`) to rebuild it"


class ShardError(CacheError):
    """One shard of a cache is missing, truncated or altered; the message names it."""

    def __init__(self, location: str, shard: str, problem: str) -> None:
        self.location, self.shard, self.problem = location, shard, problem
        super().__init__(f"shard {location}/shards/{shard} {problem}; check every shard with "
                         f"`insight cache verify {location}`, or {REBUILD_HINT}")

    def __reduce__(self):  # crosses Ray task and worker boundaries intact
        return (ShardError, (self.location, self.shard, self.problem))


def cache_error_in(exc: BaseException) -> CacheError | None:
    """The CacheError behind ``exc``, also when it crossed a Ray task, actor or Train worker boundary.

    Ray wraps a remote error (RayTaskError, WorkerGroupError.worker_failures, ControllerError)
    and prints its traceback in the message; callers re-raise the original, shard-naming message.
    """
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is x for x in seen):
            continue
        seen.append(e)
        cause = getattr(e, "cause", None)  # RayTaskError: the remote exception
        if isinstance(e, CacheError) and not isinstance(cause, BaseException):
            return e
        todo += [cause, e.__cause__, getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    # Ray Data wraps a failed UDF in UserCodeException and pickling drops its __cause__: the
    # ShardError survives only in the remote traceback text.
    for e in seen:
        m = _SHARD_ERROR_TEXT.search(f"{getattr(e, 'traceback_str', '')}\n{e}")
        if m:
            return ShardError(m["location"], m["shard"], m["problem"])
    return None


_SHARD_ERROR_TEXT = re.compile(
    r"ShardError: shard (?P<location>\S.*?)/shards/(?P<shard>[^/\s]+) (?P<problem>.+?); check every shard")


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


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes, guard: Callable[[], None] | None = None) -> None:
    """Write to a unique temp name beside ``path``, then rename over it.

    ``guard`` runs between the two and may raise to drop the write (insight.cache.lock: a worker
    of a run that no longer holds the cache folder).
    """
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    if guard is not None:
        try:
            guard()
        except BaseException:
            fs.delete_file(tmp)
            raise
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


def shard_file_name(index: int, digest: str) -> str:
    """An extracted shard's file name: its position and the start of its sha256."""
    return f"shard-{index:05d}-{digest[:12]}.parquet"


def sidecar_name(index: int) -> str:
    """The extraction sidecar of shard ``index``: named by position alone, so a resumed run finds it
    without knowing the shard file's content name (the sidecar names that file)."""
    return f"shard-{index:05d}.json"


def encode_shard(ids: list[str], indices: list[int], feats_nhwd: np.ndarray, dtype: str) -> pa.Buffer:
    """One shard's Parquet bytes (a bytes-like pyarrow Buffer).

    Features already C-contiguous in ``dtype`` (what the extraction worker fills) are handed to
    Arrow without a copy; the only copy is Parquet's own page encoding into the output buffer.
    """
    n = feats_nhwd.shape[0]
    flat = np.ascontiguousarray(feats_nhwd.reshape(n, -1), dtype=np.dtype(dtype))  # no-op when it already is
    values = pa.array(flat.reshape(-1))  # zero-copy view of a contiguous numeric array
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "index": pa.array(indices, pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(values, flat.shape[1]),
    })
    sink = pa.BufferOutputStream()  # getvalue() hands over its buffer (BytesIO.getvalue copies)
    # Float features neither compress nor dictionary-encode (a dictionary attempt
    # costs 11% more bytes at D=512); plain pages keep the file at ~4 B/value.
    pq.write_table(table, sink, compression="none", use_dictionary=["image_id"], write_statistics=False,
                   row_group_size=max(1, n))
    return sink.getvalue()


def decode_shard(data: bytes, grid: tuple[int, int], dim: int, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> (image ids, indices (n,), features (n, H, W, D) in the stored dtype)."""
    # ParquetFile on this thread, not pq.read_table: read_table's dataset scan hands the file (and
    # with it the Python buffer of ``data``) to Arrow's thread pool, which may drop it during
    # interpreter exit; taking the GIL then kills the thread inside a C++ destructor and the
    # process aborts ("terminate called without an active exception", exit 134).
    try:
        with pq.ParquetFile(pa.BufferReader(data)) as pf:
            table = pf.read(use_threads=False)
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


def sha256(data) -> str:
    """Hex sha256 of any bytes-like object (bytes, pyarrow Buffer)."""
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


def _no_cache_message(fs: pafs.FileSystem, path: str, location: str) -> str:
    """Why ``location`` is not a cache, and what to do: a missing folder, a cache root (list the caches
    under it), or an extraction that never wrote its manifest."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return f"no such folder: {location} (run `insight extract` first, or pass the folder it printed)"
    if info.type != pafs.FileType.Directory:
        return f"{location} is a file, not a cache folder"
    children = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    caches = sorted(c.base_name for c in children
                    if c.type == pafs.FileType.Directory and exists(fs, join(c.path, "manifest.json")))
    if caches:
        shown = ", ".join(caches[:10]) + (f" and {len(caches) - 10} more" if len(caches) > 10 else "")
        return (f"{location} is a cache root, not a cache; caches under it: {shown} "
                f"(e.g. `insight cache info {location}/{caches[0]}`)")
    return (f"no cache at {location}: manifest.json is missing (the extraction did not finish? "
            "rerun `insight extract` with the same config to resume it)")


class CacheReader:
    """Read a finished cache: manifest, verified shards, images, tokens, Ray Datasets."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        self.fs, self.path = resolve_fs(self.location)
        mpath = join(self.path, "manifest.json")
        if not exists(self.fs, mpath):
            raise CacheError(_no_cache_message(self.fs, self.path, self.location))
        self.manifest = Manifest.from_json(read_bytes(self.fs, mpath).decode(), where=f"{self.location}/manifest.json")

    @property
    def key(self) -> str:
        return self.manifest.key

    def shard_path(self, info: ShardInfo) -> str:
        return join(self.path, "shards", info.name)

    def _where(self, info: ShardInfo) -> str:
        return f"{self.location}/shards/{info.name}"

    def _bad(self, info: ShardInfo, problem: str) -> ShardError:
        return ShardError(self.location, info.name, problem)

    def _stat(self, info: ShardInfo) -> None:
        """The shard exists as a file of the size the manifest recorded (one metadata call)."""
        st = self.fs.get_file_info(self.shard_path(info))
        if st.type == pafs.FileType.NotFound:
            raise self._bad(info, "is missing")
        if st.type != pafs.FileType.File:
            raise self._bad(info, "is not a file")
        if st.size != info.bytes:
            raise self._bad(info, f"is corrupt: {st.size} bytes, the manifest recorded {info.bytes} (truncated?)")

    def read_shard(self, info: ShardInfo, verify: bool = True) -> tuple[list[str], np.ndarray]:
        """(image ids, features (n, H, W, D)); a missing, truncated or altered shard is a CacheError naming it."""
        self._stat(info)
        try:
            data = read_bytes(self.fs, self.shard_path(info))
        except OSError as exc:
            raise self._bad(info, f"cannot be read: {exc}") from exc
        if verify and sha256(data) != info.sha256:
            raise self._bad(info, "is corrupt: checksum mismatch")
        where = self._where(info)
        try:
            ids, _, feats = decode_shard(data, self.manifest.grid, self.manifest.dim, where)
        except CacheError as exc:
            raise self._bad(info, str(exc).removeprefix(f"shard {where} ")) from exc
        return ids, feats

    def _hash_shard(self, info: ShardInfo) -> None:
        self._stat(info)
        h = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self.shard_path(info)) as f:
                while block := f.read(1 << 22):
                    h.update(block)
        except OSError as exc:
            raise self._bad(info, f"cannot be read: {exc}") from exc
        if h.hexdigest() != info.sha256:
            raise self._bad(info, "is corrupt: checksum mismatch")

    def check(self, checksums: bool = True, threads: int = 4) -> dict[str, Any]:
        """Before a step reads the cache: every shard is there with its recorded size and, with
        ``checksums``, its recorded sha256. Raises a CacheError naming the first bad shard, so a
        step fails before it starts workers instead of inside one (or on bad values)."""
        import time
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        shards = self.manifest.shards
        for info in shards:
            self._stat(info)
        if checksums and shards:
            # hashlib releases the GIL on large blocks: a few threads hash shards in parallel.
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
                list(pool.map(self._hash_shard, shards))
        return {"shards": len(shards), "bytes": sum(s.bytes for s in shards), "checksums": checksums,
                "seconds": time.perf_counter() - t0}

    def iter_images(self, split: str | None = None, val_fraction: float = 0.0) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (image id, features (H, W, D) float32), optionally one split only."""
        for info in self.manifest.shards:
            ids, feats = self.read_shard(info)
            for i, image_id in enumerate(ids):
                if split is not None and (split == "val") != is_validation(image_id, val_fraction):
                    continue
                yield image_id, feats[i].astype(np.float32, copy=False)

    def iter_tokens(self, batch_size: int, split: str | None = None, val_fraction: float = 0.0,
                    shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 0) -> Iterator[np.ndarray]:
        """Yield (batch_size, D) float32 token batches (the last one may be smaller).

        With ``shuffle``, shards come in a random order and tokens are drawn from a pool that keeps at
        least ``shuffle_buffer`` tokens (and the newest shard) resident, reshuffled whenever a shard joins
        it, so a batch mixes many shards (like Ray Data's local shuffle buffer on the distributed path). A
        shard holds a few images' views, so batches drawn from one shard at a time are strongly
        correlated: the quickstart's SAE trained on them ended at training FVU 0.13 and validation FVU
        0.31, against 0.05 and 0.23 with the pool. A pool larger than the split shuffles it whole.
        """
        rng = np.random.default_rng(seed)
        order = list(range(len(self.manifest.shards)))
        if shuffle:
            rng.shuffle(order)
        keep_back = max(0, int(shuffle_buffer)) if shuffle else 0
        pool = np.zeros((0, self.manifest.dim), np.float32)
        for s in order:
            ids, feats = self.read_shard(self.manifest.shards[s])
            keep = [i for i, x in enumerate(ids)
                    if split is None or (split == "val") == is_validation(x, val_fraction)]
            if not keep:
                continue
            toks = feats[keep].reshape(-1, self.manifest.dim).astype(np.float32)
            pool = np.concatenate([pool, toks]) if len(pool) else toks
            if shuffle:
                pool = pool[rng.permutation(len(pool))]
            while len(pool) >= batch_size + keep_back:
                yield pool[:batch_size]
                pool = pool[batch_size:]
        for i in range(0, len(pool), batch_size):
            yield pool[i : i + batch_size]

    def to_ray_dataset(self, split: str | None = None, val_fraction: float = 0.0, num_cpus: float = 0.5):
        """A Ray Dataset of patch tokens: one row per token, column ``x`` (D,) float32.

        Read and reshape tasks ask for ``num_cpus`` each (default half a CPU) so
        they can run beside training workers that hold most of a node's CPUs.
        Each task reads whole shards through `read_shard`, so every read is checked against the
        manifest's sha256 and a bad shard fails with a CacheError that names it (Ray Data's
        Parquet reader verifies nothing and reports errors without the file).
        """
        import ray.data

        dim = self.manifest.dim
        shards = self.manifest.shards
        ds = ray.data.from_items([{"shard": i} for i in range(len(shards))],
                                 override_num_blocks=max(1, len(shards)))

        def to_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = [np.zeros((0, dim), np.float32)]
            for s in batch["shard"]:
                ids, feats = self.read_shard(shards[int(s)])
                if split is not None:
                    keep = [i for i, x in enumerate(ids) if (split == "val") == is_validation(x, val_fraction)]
                    feats = feats[keep]
                out.append(feats.reshape(-1, dim).astype(np.float32, copy=False))  # float32: the split's copy is the only one
            return {"x": np.concatenate(out)}

        return ds.map_batches(to_tokens, batch_size=1, batch_format="numpy", num_cpus=num_cpus)

    def text_embeddings(self) -> tuple[list[str], np.ndarray] | None:
        """Vocabulary embeddings imported with the features, if any."""
        if not self.manifest.text:
            return None
        from safetensors.numpy import load as st_load

        data = read_bytes(self.fs, join(self.path, self.manifest.text["file"]))
        return list(self.manifest.text["words"]), st_load(data)["text"]
