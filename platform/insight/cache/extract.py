"""`insight extract`: images -> backbone -> patch-grid shards, as a Ray Data pipeline.

The work list is fixed up front: every (image, view) gets an index, and shard i
holds indices [i*S, (i+1)*S). That makes a shard's content a pure function of
the config, so a rerun skips shards whose sidecar exists (resume) and a
finished cache (manifest present) costs nothing (idempotence). A shard file is
named by its content (``shard-00012-<sha256 prefix>.parquet``; the sidecar and the
manifest name it): when a shard is written twice (a replica on a lost node and
its retry, whose bytes may differ in the last float bits), each write lands in
its own file, so the manifest can never pair one write's checksum with the
other's bytes; the files it does not name are removed when it is written. Shards are the
unit of work of a pool of backbone replicas (Ray Data actors, GPUs when
configured); the driver only collects small metadata rows and shows progress.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from insight.cache.format import (
    CacheReader,
    Manifest,
    ShardInfo,
    atomic_write,
    content_key,
    encode_shard,
    exists,
    join,
    read_bytes,
    resolve_fs,
    sha256,
    shard_file_name,
    sidecar_name,
)
from insight.cache.locate import cache_location
from insight.cache.lock import ExtractionLock, make_guard
from insight.runtime import ensure_ray

log = logging.getLogger(__name__)


def work_items(records, views: int) -> list[dict[str, Any]]:
    """(image, view) pairs in a fixed order; view 0 is the plain image."""
    items = []
    for r in records:
        for v in range(views):
            image_id = r.image_id if v == 0 else f"{r.image_id}#v{v}"
            items.append({"index": len(items), "image_id": image_id, "base_id": r.image_id, "path": r.path, "view": v})
    return items


def cache_identity(cfg, backbone_identity: dict, dataset_identity: dict) -> dict[str, Any]:
    return {
        "backbone": backbone_identity,
        "dataset": dataset_identity,
        "views": cfg.data.views,
        "augment": cfg.data.augment.model_dump() if cfg.data.views > 1 else None,
        "dtype": cfg.cache.dtype,
        "shard_images": cfg.cache.shard_images,
        "transform": "albumentations:smallest-max-size+center-crop+normalize",
    }


# Shards one replica works on at once. Two let one shard's image decode, augmentation and Parquet
# write run while the other's forward holds the model (the forward itself runs one at a time).
SHARDS_IN_FLIGHT = 2


class ShardWorker:
    """A backbone replica: encodes whole shards and writes them atomically.

    Ray Data runs up to SHARDS_IN_FLIGHT calls of one replica concurrently (threads). Each call
    decodes and augments its next batch on a helper thread while the current one goes through the
    model, which one call at a time holds (``_model``), so the model's threads stay busy while
    another shard is decoded or written. Forward outputs go straight into one array per shard in
    the configured dtype, which the shard writer hands to Arrow without another copy. Every shard's
    sidecar records its stage times (``stages``) and wall-clock span, which bench/extract.py adds up.
    """

    def __init__(self, cfg_json: str, items: list[dict], location: str, grid: tuple[int, int],
                 threads: int, token: str) -> None:
        import threading

        import torch

        from insight.backbones import build_backbone
        from insight.config import InsightConfig
        from insight.data.transforms import Preprocessor

        t0 = time.perf_counter()
        torch.set_num_threads(max(1, threads))
        self.cfg = InsightConfig.model_validate_json(cfg_json)
        self.backbone = build_backbone(self.cfg.backbone)
        bb = self.backbone
        self.pre = Preprocessor(bb.image_size, bb.mean, bb.std, self.cfg.data.augment)
        self.items = items
        self.fs, self.path = resolve_fs(location)
        self.grid = grid
        self.token = token  # the run's hold on the folder: see insight.cache.lock
        self._model = threading.Lock()
        self.init_s = time.perf_counter() - t0
        try:  # which node and process did the work (the scale-out benchmark checks the placement)
            import ray

            self.replica = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
        except Exception:  # noqa: BLE001 - outside Ray (a direct call)
            self.replica = f"local:{os.getpid()}"

    def _prepare(self, items: list[dict], last: dict[str, Any], t: dict[str, float]):
        """Decode (once per image, its views share it) and augment ``items`` -> (ids, indices, NCHW, skipped)."""
        from insight.data.datasets import load_image

        ids, idx, tensors, skipped = [], [], [], {}
        for item in items:
            if last.get("path") != item["path"]:
                t0 = time.perf_counter()
                last.update(path=item["path"], image=load_image(item["path"]))
                t["decode"] += time.perf_counter() - t0
            rgb, why = last["image"]
            if rgb is None:
                skipped[item["image_id"]] = why
                continue
            t0 = time.perf_counter()
            tensors.append(self.pre(rgb, item["base_id"], item["view"]))
            t["augment"] += time.perf_counter() - t0
            ids.append(item["image_id"])
            idx.append(item["index"])
        x = np.stack(tensors) if tensors else None
        return ids, idx, x, skipped

    def _encode(self, items: list[dict], t: dict[str, float]):
        """Forward ``items`` in batches, overlapping the next batch's preparation; -> (ids, idx, feats, skipped)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        bs = self.cfg.extract.batch_size
        chunks = [items[i : i + bs] for i in range(0, len(items), bs)]
        d = self.backbone.dim
        feats = np.empty((len(items), *self.grid, d), dtype=np.dtype(self.cfg.cache.dtype))
        ids, idx, skipped, n = [], [], {}, 0
        last: dict[str, Any] = {}  # the decoded image the previous item used (its views follow it)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="insight-prep") as prep:
            nxt = prep.submit(self._prepare, chunks[0], last, t) if chunks else None
            for j in range(len(chunks)):
                t0 = time.perf_counter()
                b_ids, b_idx, x, b_skipped = nxt.result()
                t["prep_wait"] += time.perf_counter() - t0
                if j + 1 < len(chunks):
                    nxt = prep.submit(self._prepare, chunks[j + 1], last, t)
                skipped.update(b_skipped)
                if x is None:
                    continue
                t0 = time.perf_counter()
                with self._model:
                    t1 = time.perf_counter()
                    out = self.backbone.encode_patches(torch.from_numpy(x))
                    t2 = time.perf_counter()
                t["model_wait"] += t1 - t0
                t["forward"] += t2 - t1
                if tuple(out.shape[1:3]) != tuple(self.grid):
                    raise RuntimeError(f"backbone produced grid {tuple(out.shape[1:3])}, expected {self.grid}")
                feats[n : n + len(b_ids)] = out.numpy()  # the one copy, into the stored dtype
                t["copy"] += time.perf_counter() - t2
                ids += b_ids
                idx += b_idx
                n += len(b_ids)
        return ids, idx, feats[:n], skipped

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "meta": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            begun, t0, cpu0 = time.time(), time.perf_counter(), time.process_time()
            t = dict.fromkeys(("decode", "augment", "prep_wait", "model_wait", "forward", "copy", "write"), 0.0)
            ids, idx, feats, skipped = self._encode(self.items[int(start) : int(stop)], t)
            t1 = time.perf_counter()
            data = encode_shard(ids, idx, feats, self.cfg.cache.dtype)
            digest = sha256(data)
            name = shard_file_name(int(shard), digest)
            info = ShardInfo(name=name, images=len(ids), tokens=len(ids) * self.grid[0] * self.grid[1],
                             sha256=digest, bytes=len(data), first_index=int(start))
            guard = make_guard(self.fs, self.path, self.token, f"shard {name}")
            atomic_write(self.fs, join(self.path, "shards", name), data, guard=guard)
            t["write"] = time.perf_counter() - t1
            side = {"info": asdict(info), "skipped": skipped, "seconds": time.perf_counter() - t0,
                    "stages": {k: round(v, 4) for k, v in t.items()}, "span": [begun, time.time()],
                    "cpu": [cpu0, time.process_time()],  # the replica process's CPU seconds (all its threads)
                    "replica_init_s": round(self.init_s, 3), "replica": self.replica}
            atomic_write(self.fs, join(self.path, "shards", sidecar_name(int(shard))),
                         json.dumps(side).encode(), guard=guard)
            out["shard"].append(int(shard))
            out["meta"].append(json.dumps(side))
        return {"shard": np.array(out["shard"], dtype=np.int64), "meta": np.array(out["meta"], dtype=object)}


def _probe_grid(backbone) -> tuple[int, int]:
    g = backbone.image_size // backbone.patch_size
    return (g, g)


def extract(cfg, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or skip) the extraction of ``cfg``; returns the result summary."""
    from insight.backbones import build_backbone
    from insight.data.datasets import build_dataset

    t_start = time.perf_counter()
    dataset = build_dataset(cfg.data, cfg.workdir)
    backbone = build_backbone(cfg.backbone, device="cpu")
    identity = cache_identity(cfg, backbone.identity(), dataset.identity())
    key = content_key(identity)
    grid = _probe_grid(backbone)
    location = cache_location(cfg, key)
    fs, path = resolve_fs(location)
    base = {"cache": location, "key": key, "grid": list(grid), "dim": backbone.dim}

    def finished() -> dict[str, Any]:
        m = CacheReader(location).manifest
        return {**base, "new_shards": 0, "shards": len(m.shards), "images": m.num_images,
                "tokens": m.num_tokens, "skipped": len(m.skipped), "seconds": time.perf_counter() - t_start,
                "status": "complete (nothing to do)"}

    if exists(fs, join(path, "manifest.json")):
        return finished()
    # One run writes the folder at a time; the leftovers of a killed run cannot write into it.
    with ExtractionLock(fs, path) as lock:
        if exists(fs, join(path, "manifest.json")):  # finished by the run that held the lock before
            return finished()
        return _extract_locked(cfg, progress, dataset, backbone, identity, key, grid, location, lock,
                               base, t_start)


def _extract_locked(cfg, progress: bool, dataset, backbone, identity: dict[str, Any], key: str,
                    grid: tuple[int, int], location: str, lock: ExtractionLock, base: dict[str, Any],
                    t_start: float) -> dict[str, Any]:
    fs, path = lock.fs, lock.folder
    items = work_items(dataset.records, cfg.data.views)
    size = cfg.cache.shard_images
    plan = [(s, s * size, min(len(items), (s + 1) * size)) for s in range((len(items) + size - 1) // size)]
    done: dict[int, dict] = {}
    for s, _, _ in plan:
        side = join(path, "shards", sidecar_name(s))
        if not exists(fs, side):
            continue
        rec = json.loads(read_bytes(fs, side))
        shard = fs.get_file_info(join(path, "shards", rec["info"]["name"]))
        if shard.type == pafs.FileType.File and shard.size == rec["info"]["bytes"]:  # else redo it
            done[s] = rec
    todo = [p for p in plan if p[0] not in done]
    log.info("extract: %d images x %d views -> %d shards (%d done, %d to do) at %s",
             len(dataset), cfg.data.views, len(plan), len(done), len(todo), location)

    new_images = 0
    t_work = time.perf_counter()
    if todo:
        import ray.data
        from tqdm import tqdm

        ensure_ray(cfg)
        ds = ray.data.from_items(
            [{"shard": s, "start": a, "stop": b} for s, a, b in todo], override_num_blocks=len(todo)
        )
        gpus = cfg.extract.gpus_per_worker
        results = ds.map_batches(
            ShardWorker,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(by_alias=True), "items": items,
                                   "location": location, "grid": grid,
                                   "threads": int(cfg.extract.cpus_per_worker), "token": lock.token},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.extract.num_workers,
                                               max_concurrent_calls_per_actor=SHARDS_IN_FLIGHT,
                                               # no queue behind them: a replica that starts later still gets shards
                                               max_tasks_in_flight_per_actor=SHARDS_IN_FLIGHT,
                                               enable_true_multi_threading=True),
            num_cpus=cfg.extract.cpus_per_worker,
            num_gpus=gpus if gpus > 0 else None,
            batch_format="numpy",
        )
        total = sum(b - a for _, a, b in todo)
        bar = tqdm(total=total, unit="img", desc="extract", file=sys.stderr, disable=not progress)
        for row in results.iter_rows():
            side = json.loads(row["meta"])
            done[int(row["shard"])] = side
            n = side["info"]["images"] + len(side["skipped"])
            new_images += side["info"]["images"]
            bar.update(n)
        bar.close()
    seconds_work = time.perf_counter() - t_work

    manifest = Manifest(key=key, grid=grid, dim=backbone.dim, dtype=cfg.cache.dtype, identity=identity)
    for s, _, _ in plan:
        manifest.shards.append(ShardInfo(**done[s]["info"]))
        manifest.skipped.update(done[s]["skipped"])
    atomic_write(fs, join(path, "manifest.json"), manifest.to_json().encode(), guard=lock.guard("the manifest"))
    named = {info.name for info in manifest.shards}
    for f in fs.get_file_info(pafs.FileSelector(join(path, "shards"), allow_not_found=True)):
        # .tmp- files left by killed workers (live ones of this run are done), and the shard files of a
        # shard written twice (a lost node's replica and its retry) that the manifest does not name
        if f.base_name.startswith(".tmp-") or (f.base_name.endswith(".parquet") and f.base_name not in named):
            fs.delete_file(f.path)
    if manifest.skipped:
        log.warning("extract: skipped %d unreadable images: %s", len(manifest.skipped),
                    ", ".join(f"{k} ({v})" for k, v in list(manifest.skipped.items())[:5]))
    return {**base, "new_shards": len(todo), "shards": len(plan), "images": manifest.num_images,
            "tokens": manifest.num_tokens, "skipped": len(manifest.skipped),
            "skipped_ids": sorted(manifest.skipped)[:50],
            "images_per_s": new_images / seconds_work if todo and seconds_work > 0 else None,
            "seconds_work": seconds_work if todo else 0.0,
            "bytes_per_token": (sum(s.bytes for s in manifest.shards) / max(1, manifest.num_tokens)),
            "seconds": time.perf_counter() - t_start, "status": "written"}
