"""Benchmark: `insight extract` against a plain loop of open_clip `encode_image`.

Same images (the bundled samples with augmented views), same model, same
threads, in one run: rounds alternate plain -> insight and insight -> plain so
that a machine whose load drifts penalises neither. Prints images/s of each,
their ratio per round and the median, where insight's time goes (decode,
augment, forward, hand-off, write) and what reading the cache back costs
(whole shards with the sha256 check against Ray Data's own Parquet reader). The
last stdout line is JSON.

    python bench/extract.py                       # ViT-B-16 (random init: no weights offline), 224 px
    python bench/extract.py --quick               # fewer images, one round
    python bench/extract.py --model tiny          # the tiny test model
    python bench/extract.py --serial              # also insight with one shard at a time per replica

Steady-state throughput for both: the plain loop after one warm-up batch and
with its images decoded before the clock starts; insight from the first shard's
start to the last shard's end on its replica (model build and Ray start
excluded, reported separately), decode and augmentation included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from insight.runtime import offline_env

offline_env()
os.environ.setdefault("INSIGHT_LOG", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("decode", "augment", "prep_wait", "model_wait", "forward", "copy", "write")


def load() -> float:
    return os.getloadavg()[0]


class PlainLoop:
    """open_clip's own preprocess + encode_image over the same images, model built once."""

    def __init__(self, cfg, paths: list[str], views: int, batch: int, threads: int) -> None:
        import open_clip
        import torch
        from PIL import Image

        from insight.backbones.openclip import register_architecture

        torch.set_num_threads(threads)
        if cfg.backbone.architecture:
            register_architecture(cfg.backbone.model, cfg.backbone.architecture)
        torch.manual_seed(cfg.backbone.seed)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            cfg.backbone.model, pretrained=None, force_image_size=cfg.backbone.image_size)
        self.model.eval()
        self.paths, self.views, self.batch, self.threads = paths, views, batch, threads
        self.Image = Image

    def __call__(self) -> tuple[float, float]:
        """(images per second, images per CPU second of this process). Images are decoded before the clock starts (insight decodes inside its timing),
        so the comparison leans towards the plain loop."""
        import torch

        torch.set_num_threads(self.threads)
        images = [self.Image.open(p).convert("RGB") for p in self.paths for _ in range(self.views)]
        b = self.batch
        with torch.inference_mode():
            self.model.encode_image(torch.stack([self.preprocess(im) for im in images[:b]]))  # warm-up
            t0, cpu0 = time.perf_counter(), time.process_time()
            for i in range(0, len(images), b):
                self.model.encode_image(torch.stack([self.preprocess(im) for im in images[i : i + b]]))
            return len(images) / (time.perf_counter() - t0), len(images) / (time.process_time() - cpu0)


def insight_round(cfg) -> dict:
    """One extraction into a fresh cache; throughput and per-stage seconds from the shard sidecars."""
    from insight.cache.extract import extract

    t0, called = time.perf_counter(), time.time()
    res = extract(cfg, progress=False)
    wall, returned = time.perf_counter() - t0, time.time()
    sides = [json.loads(p.read_text()) for p in (Path(res["cache"]) / "shards").glob("*.json")]
    spans = sorted(s["span"] for s in sides)
    begin, end = spans[0][0], max(e for _, e in spans)
    busy, reach = 0.0, begin  # the union of the shards' intervals
    for a, b in spans:
        busy += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    stages = {k: sum(s["stages"][k] for s in sides) for k in STAGES}
    cpu = max(s["cpu"][1] for s in sides) - min(s["cpu"][0] for s in sides)  # one replica: one process
    return {"images": res["images"], "images_per_s": res["images"] / (end - begin), "span_s": end - begin,
            "images_per_cpu_s": res["images"] / cpu,
            "stages_s": stages, "replica_init_s": max(s["replica_init_s"] for s in sides),
            # Ray Data hand-offs: inside the span, time no shard was in flight on the replica; after it, the
            # last result's way back to the driver plus the manifest write
            "handoff_idle_s": (end - begin) - busy, "handoff_tail_s": returned - end,
            # before the first shard: cache checks, Ray Data's plan, the replica's process start and model build
            "startup_s": begin - called, "wall_s_incl_startup": wall, "cache": res["cache"],
            "bytes_per_token": res["bytes_per_token"], "dim": res["dim"], "grid": res["grid"]}


def read_path(work: Path, grid: list[int], dim: int, dtype: str, images: int, repeats: int = 3) -> dict:
    """Reading a cache back, on a cache of ``images`` random feature maps of the extraction's shape
    imported through `insight cache import`: whole shards with and without the sha256 check
    (alternated), sha256 alone, and the token Dataset training streams (`to_ray_dataset`) against
    Ray Data's own Parquet reader over the same files."""
    import hashlib

    import numpy as np
    import ray.data

    from insight.cache import CacheReader
    from insight.cache.format import read_bytes
    from insight.cache.importer import import_features

    feats = np.random.default_rng(0).standard_normal((images, *grid, dim)).astype(dtype)
    np.save(work / "read.npy", feats)
    del feats
    r = CacheReader(import_features(str(work / "read.npy"), str(work / "read-cache"), shard_images=64)["cache"])
    shards = r.manifest.shards
    mb = sum(s.bytes for s in shards) / 1e6
    for info in shards:  # warm the page cache and Arrow
        r.read_shard(info)
    t = {True: 0.0, False: 0.0}
    for _ in range(repeats):
        for verify in (True, False):
            t0 = time.perf_counter()
            for info in shards:
                r.read_shard(info, verify=verify)
            t[verify] += time.perf_counter() - t0
    raw = [read_bytes(r.fs, r.shard_path(i)) for i in shards]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for data in raw:
            hashlib.sha256(data).hexdigest()
    hashing = time.perf_counter() - t0

    def tokens_per_s(ds) -> float:
        t0 = time.perf_counter()
        n = sum(len(b["x"]) for b in ds.iter_batches(batch_size=4096, batch_format="numpy"))
        return n / (time.perf_counter() - t0)

    files = [r.shard_path(i) for i in shards]
    ours, plain = [], []
    for _ in range(2):  # alternated: Ray Data's start-up costs land on both
        ours.append(tokens_per_s(r.to_ray_dataset()))
        plain.append(tokens_per_s(ray.data.read_parquet(files).select_columns(["features"]).map_batches(
            lambda b: {"x": np.stack(list(b["features"])).reshape(-1, dim).astype(np.float32, copy=False)},
            batch_format="numpy")))
    return {"read_cache_MB": mb, "shard_MB_per_s_verified": mb * repeats / t[True],
            "shard_MB_per_s_unverified": mb * repeats / t[False], "sha256_MB_per_s": mb * repeats / hashing,
            "sha256_share_of_read": 1 - t[False] / t[True],
            "dataset_tokens_per_s": max(ours), "read_parquet_tokens_per_s": max(plain),
            "dataset_vs_read_parquet": max(ours) / max(plain)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'tiny'")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shard-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating plain/insight rounds")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--serial", action="store_true",
                    help="also time insight with one shard in flight per replica (no overlap across shards)")
    ap.add_argument("--read-images", type=int, default=512,
                    help="feature maps in the cache the read path is timed on (ViT-B-16: 0.4 MB each in float32)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.views, args.rounds, args.read_images = min(args.images, 4), min(args.views, 4), 1, 128

    import ray

    import insight.cache.extract as ex
    from insight.config import load_config
    from insight.data import build_dataset

    work = Path(tempfile.mkdtemp(prefix="insight-bench-"))
    sets = [f"workdir={work}", f"data.max_images={args.images}", f"data.views={args.views}",
            f"extract.batch_size={args.batch}", f"extract.cpus_per_worker={args.threads}",
            f"cluster.num_cpus={args.threads}", f"cache.shard_images={args.shard_images}",
            f"cache.dtype={args.dtype}"]
    if args.model != "tiny":
        sets += [f"backbone.model={args.model}", "backbone.architecture=null", "backbone.image_size=224"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    paths = [r.path for r in build_dataset(cfg.data, cfg.workdir).records]
    plain_loop = PlainLoop(cfg, paths, args.views, args.batch, args.threads)
    in_flight = ex.SHARDS_IN_FLIGHT

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    rounds = []
    try:
        for r in range(args.rounds):
            row = {"round": r, "load_start": load()}
            variants = ["plain", "insight"] + (["serial"] if args.serial else [])
            for v in (variants if r % 2 == 0 else variants[::-1]):
                if v == "plain":
                    row["plain"], row["plain_cpu"] = plain_loop()
                else:
                    ex.SHARDS_IN_FLIGHT = 1 if v == "serial" else in_flight
                    c = load_config(ROOT / "configs" / "tiny.yaml", [*sets, f"cache.root={work}/cache-{v}-{r}"])
                    row[v] = insight_round(c)
                    ex.SHARDS_IN_FLIGHT = in_flight
            row["load_end"] = load()
            row["ratio"] = row["insight"]["images_per_s"] / row["plain"]
            # images per CPU second: the work each does per image, whatever share of the cores others took
            row["ratio_cpu"] = row["insight"]["images_per_cpu_s"] / row["plain_cpu"]
            if args.serial:
                row["ratio_serial"] = row["serial"]["images_per_s"] / row["plain"]
            rounds.append(row)
            ins = row["insight"]
            print(f"round {r}: load {row['load_start']:.1f}->{row['load_end']:.1f} | plain {row['plain']:.2f} img/s"
                  f" | insight {ins['images_per_s']:.2f} img/s (ratio {row['ratio']:.2f})"
                  + (f" | serial {row['serial']['images_per_s']:.2f} img/s" if args.serial else "")
                  + f" | per CPU-s: plain {row['plain_cpu']:.2f}, insight {ins['images_per_cpu_s']:.2f} img", file=sys.stderr)
        last = rounds[-1]["insight"]
        reads = read_path(work, last["grid"], last["dim"], args.dtype, args.read_images)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    n = last["images"]
    # Per image: each stage's busy time, and the part of the span the forward did not cover.
    per_image = {k: round(1000 * v / n, 1) for k, v in last["stages_s"].items()}
    per_image["span"] = round(1000 * last["span_s"] / n, 1)
    per_image["not_forward"] = round(1000 * (last["span_s"] - last["stages_s"]["forward"]) / n, 1)
    per_image["handoff"] = round(1000 * (last["handoff_idle_s"] + last["handoff_tail_s"]) / n, 1)
    ratios = [r["ratio"] for r in rounds]
    out = {
        "bench": "extract", "model": args.model, "image_size": cfg.backbone.image_size,
        "images": n, "threads": args.threads, "rounds": len(rounds), "shards_in_flight": in_flight,
        "plain_open_clip_images_per_s": [round(r["plain"], 3) for r in rounds],
        "insight_images_per_s": [round(r["insight"]["images_per_s"], 3) for r in rounds],
        "ratio_per_round": [round(x, 3) for x in ratios], "ratio_median": round(statistics.median(ratios), 3),
        "ratio_cpu_per_round": [round(r["ratio_cpu"], 3) for r in rounds],
        "load_avg": [[round(r["load_start"], 2), round(r["load_end"], 2)] for r in rounds],
        "ms_per_image_last_round": per_image,
        "replica_init_s": round(last["replica_init_s"], 2), "startup_s": round(last["startup_s"], 2),
        "handoff_idle_s": round(last["handoff_idle_s"], 3), "handoff_tail_s": round(last["handoff_tail_s"], 3),
        "insight_wall_s_incl_startup": round(last["wall_s_incl_startup"], 2),
        "bytes_per_token": round(last["bytes_per_token"], 1), "dim": last["dim"], "dtype": args.dtype,
        "read_path": {k: round(v, 3) for k, v in reads.items()},
    }
    if args.serial:
        out["serial_images_per_s"] = [round(r["serial"]["images_per_s"], 3) for r in rounds]
        out["ratio_serial_per_round"] = [round(r["ratio_serial"], 3) for r in rounds]
    print(f"median ratio {out['ratio_median']:.2f} over {len(rounds)} rounds | ms/image {per_image} | "
          f"{last['bytes_per_token']:.0f} B/token | read: {reads['shard_MB_per_s_verified']:.0f} MB/s verified, "
          f"{reads['shard_MB_per_s_unverified']:.0f} unverified, sha256 {reads['sha256_MB_per_s']:.0f} MB/s",
          file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
