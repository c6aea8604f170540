"""`insight extract`: images -> backbone -> patch-grid shards, as a Ray Data pipeline.

The work list is fixed up front: every (image, view) gets an index, and shard i
holds indices [i*S, (i+1)*S). That makes a shard's content a pure function of
the config, so a rerun skips shards whose sidecar exists (resume) and a
finished cache (manifest present) costs nothing (idempotence). Shards are the
unit of work of a pool of backbone replicas (Ray Data actors, GPUs when
configured); the driver only collects small metadata rows and shows progress.
"""

from __future__ import annotations

import json
import logging
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
)
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


class ShardWorker:
    """A backbone replica: encodes whole shards and writes them atomically."""

    def __init__(self, cfg_json: str, items: list[dict], location: str, grid: tuple[int, int],
                 threads: int, token: str) -> None:
        import torch

        from insight.backbones import build_backbone
        from insight.config import InsightConfig
        from insight.data.transforms import Preprocessor

        torch.set_num_threads(max(1, threads))
        self.cfg = InsightConfig.model_validate_json(cfg_json)
        self.backbone = build_backbone(self.cfg.backbone)
        bb = self.backbone
        self.pre = Preprocessor(bb.image_size, bb.mean, bb.std, self.cfg.data.augment)
        self.items = items
        self.fs, self.path = resolve_fs(location)
        self.grid = grid
        self.token = token  # the run's hold on the folder: see insight.cache.lock

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from insight.data.datasets import load_image

        out: dict[str, list] = {"shard": [], "meta": []}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            t0 = time.perf_counter()
            ids, idx, tensors, skipped = [], [], [], {}
            decoded: dict[str, Any] = {}
            for item in self.items[int(start) : int(stop)]:
                if item["path"] not in decoded:
                    decoded = {item["path"]: load_image(item["path"])}
                rgb, why = decoded[item["path"]]
                if rgb is None:
                    skipped[item["image_id"]] = why
                    continue
                ids.append(item["image_id"])
                idx.append(item["index"])
                tensors.append(self.pre(rgb, item["base_id"], item["view"]))
            chunks = []
            bs = self.cfg.extract.batch_size
            for i in range(0, len(tensors), bs):
                chunks.append(self.backbone.encode_patches(torch.from_numpy(np.stack(tensors[i : i + bs]))).numpy())
            d = self.backbone.dim
            feats = np.concatenate(chunks) if chunks else np.zeros((0, *self.grid, d), np.float32)
            if feats.shape[1:3] != tuple(self.grid):
                raise RuntimeError(f"backbone produced grid {feats.shape[1:3]}, expected {self.grid}")
            data = encode_shard(ids, idx, feats, self.cfg.cache.dtype)
            name = f"shard-{int(shard):05d}.parquet"
            info = ShardInfo(name=name, images=len(ids), tokens=len(ids) * self.grid[0] * self.grid[1],
                             sha256=sha256(data), bytes=len(data), first_index=int(start))
            guard = make_guard(self.fs, self.path, self.token, f"shard {name}")
            atomic_write(self.fs, join(self.path, "shards", name), data, guard=guard)
            side = {"info": asdict(info), "skipped": skipped, "seconds": time.perf_counter() - t0}
            atomic_write(self.fs, join(self.path, "shards", name.replace(".parquet", ".json")),
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
    location = join(cfg.path(cfg.cache.root), key)
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
        side = join(path, "shards", f"shard-{s:05d}.json")
        shard = fs.get_file_info(side.replace(".json", ".parquet"))
        if exists(fs, side) and shard.type == pafs.FileType.File:
            rec = json.loads(read_bytes(fs, side))
            if shard.size == rec["info"]["bytes"]:  # else redo: the pair does not belong together
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
            compute=ray.data.ActorPoolStrategy(size=cfg.extract.num_workers),
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
    for f in fs.get_file_info(pafs.FileSelector(join(path, "shards"), allow_not_found=True)):
        if f.base_name.startswith(".tmp-"):  # left by killed workers; live ones of this run are done
            fs.delete_file(f.path)
    if manifest.skipped:
        log.warning("extract: skipped %d unreadable images: %s", len(manifest.skipped),
                    ", ".join(f"{k} ({v})" for k, v in list(manifest.skipped.items())[:5]))
    return {**base, "new_shards": len(todo), "shards": len(plan), "images": manifest.num_images,
            "tokens": manifest.num_tokens, "skipped": len(manifest.skipped),
            "skipped_ids": sorted(manifest.skipped)[:50],
            "images_per_s": new_images / seconds_work if todo and seconds_work > 0 else None,
            "bytes_per_token": (sum(s.bytes for s in manifest.shards) / max(1, manifest.num_tokens)),
            "seconds": time.perf_counter() - t_start, "status": "written"}
