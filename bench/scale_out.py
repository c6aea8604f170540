"""Benchmark: scale-out from one to two Ray nodes, for SAE training and for extraction.

Starts a local Ray cluster with `insight.localcluster` (a head without CPUs and two
worker nodes, each with ``--cpus-per-node`` logical CPUs; no PostgreSQL, S3 or
MLflow server), then runs, on that cluster:

- `insight train` (Ray Train, data-parallel SAE) with 1 and 2 workers on the same
  token cache: tokens/s over the last ``--steps`` steps (the first ``--steps`` warm up; the
  timed ones include rank 0's report of the first: validation, MLflow metrics);
- `insight extract` with 1 and 2 backbone replicas on the same images: images/s from
  the first shard's start to the last shard's end (replica start excluded), and the sum of
  each replica's own rate (a replica that started later does not count its wait).

Each worker reserves 1.5 CPUs, so Ray places one per node (Train packs its workers:
two would share one node of 2 CPUs otherwise) and runs it with one thread
(OMP_NUM_THREADS=1). Efficiency = rate with 2 / (2 x rate with 1). The cluster is
stopped on every exit path. The last stdout line is JSON.

    python bench/scale_out.py            # SAE D=512 M=2048, tiny backbone extraction
    python bench/scale_out.py --quick

Both "nodes" are processes on this machine: they share its cores (``nproc``), so
the figures say what Ray's hand-offs cost and how the work divides, not what two
real machines would add.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from insight.runtime import offline_env

offline_env()
os.environ.setdefault("INSIGHT_LOG", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
WORKER_CPUS = 1.5  # over half a 2-CPU node: Ray puts one Train worker or replica per node


def load() -> float:
    return os.getloadavg()[0]


def wait_for_memory(gib: float, timeout_s: float = 600) -> float:
    """Available memory in GiB, after waiting (bounded) for ``gib`` to be free: the machine is shared."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        avail = psutil.virtual_memory().available / 2**30
        if avail >= gib or time.monotonic() > deadline:
            return avail
        print(f"waiting for {gib:.0f} GiB of free memory ({avail:.1f} GiB now)", file=sys.stderr)
        time.sleep(15)


def token_cache(work: Path, dim: int, tokens: int) -> str:
    """Random features imported through `insight cache import` (training speed does not depend on them)."""
    import numpy as np

    from insight.cache.importer import import_features

    grid = 16
    images = max(1, tokens // (grid * grid))
    feats = np.random.default_rng(0).standard_normal((images, grid, grid, dim), dtype=np.float32)
    np.save(work / "tokens.npy", feats)
    return import_features(str(work / "tokens.npy"), str(work / "token-cache"), shard_images=32)["cache"]


def train_rate(address: str, work: Path, cache: str, n: int, args) -> dict:
    from insight.config import load_config
    from insight.training.sae import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"workdir={work / f'train-{n}'}", f"cluster.address={address}", f"train.cache={cache}",
        f"train.num_workers={n}", f"train.cpus_per_worker={WORKER_CPUS}", f"train.batch_size={args.batch}",
        f"train.max_steps={2 * args.steps}", f"train.log_every={args.steps}", f"train.checkpoint_every={2 * args.steps}",
        f"sae.expansion={args.expansion}", "sae.k=12", "sae.depth=null", "sae.threshold_calibration_batches=0",
        "train.shuffle_buffer=0"])
    t0 = time.perf_counter()
    res = train(cfg)
    return {"tokens_per_s": res["tokens_per_s"], "wall_s": time.perf_counter() - t0, "fvu": res["fvu"]}


def extract_rate(address: str, work: Path, n: int, args, tag: str) -> dict:
    from insight.cache.extract import extract
    from insight.config import load_config

    sets = [f"workdir={work / f'extract-{tag}'}", f"cluster.address={address}", f"extract.num_workers={n}",
            f"extract.cpus_per_worker={WORKER_CPUS}", f"data.max_images={args.images}", f"data.views={args.views}",
            "cache.shard_images=16"]
    if args.model != "tiny":
        sets += [f"backbone.model={args.model}", "backbone.architecture=null", "backbone.image_size=224"]
    res = extract(load_config(ROOT / "configs" / "tiny.yaml", sets), progress=False)
    sides = [json.loads(p.read_text()) for p in (Path(res["cache"]) / "shards").glob("*.json")]
    begin, end = min(s["span"][0] for s in sides), max(s["span"][1] for s in sides)
    replicas: dict[str, list] = {}
    for s in sides:
        replicas.setdefault(s.get("replica", "?"), []).append(s)
    own = {r: sum(s["info"]["images"] for s in ss) / (max(s["span"][1] for s in ss) - min(s["span"][0] for s in ss))
           for r, ss in replicas.items()}
    return {"images_per_s": res["images"] / (end - begin), "images": res["images"],
            "sum_of_replica_rates": sum(own.values()),
            "replicas": {r: round(v, 2) for r, v in own.items()},
            "nodes": len({r.split(":")[0] for r in replicas})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each Ray worker node")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2048, help="global SAE batch in tokens")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up steps)")
    ap.add_argument("--model", default="tiny", help="extraction backbone: open_clip name or 'tiny'")
    ap.add_argument("--images", type=int, default=25)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", choices=["train", "extract"], help="leave one half out")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.views = 3, 4

    import ray

    from insight.localcluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="insight-scale-"))
    avail = wait_for_memory(4.0)
    cache = token_cache(work, args.dim, 4 * args.batch * args.steps) if args.skip != "train" else None
    out = {"bench": "scale_out", "nproc": os.cpu_count(), "cpus_per_node": args.cpus_per_node,
           "worker_cpus": WORKER_CPUS, "threads_per_worker": 1, "mem_available_gib": round(avail, 1),
           "load_start": round(load(), 2)}
    (work / "cluster").mkdir()
    # a loaded machine can take longer than the default 30 s to register a raylet
    cluster = LocalCluster(root=work / "cluster", env={"OMP_NUM_THREADS": "1", "RAY_raylet_start_wait_time_s": "150"})
    try:
        cluster.save()
        cluster.start_ray(workers=2, cpus_per_worker=args.cpus_per_node)
        address = cluster.urls["ray_gcs"]
        if args.skip != "train":
            t = {n: train_rate(address, work, cache, n, args) for n in (1, 2)}
            out["train"] = {"sae": f"D={args.dim} M={args.dim * args.expansion} k=12 batch={args.batch}",
                            "tokens_per_s_1": round(t[1]["tokens_per_s"]), "tokens_per_s_2": round(t[2]["tokens_per_s"]),
                            "efficiency": round(t[2]["tokens_per_s"] / (2 * t[1]["tokens_per_s"]), 3),
                            "wall_s": [round(t[1]["wall_s"], 1), round(t[2]["wall_s"], 1)],
                            "load_after": round(load(), 2)}
            print(f"train: 1 worker {t[1]['tokens_per_s']:,.0f} tok/s | 2 workers {t[2]['tokens_per_s']:,.0f} tok/s"
                  f" | efficiency {out['train']['efficiency']:.2f} | load {load():.1f}", file=sys.stderr)
        if args.skip != "extract":
            e = {n: extract_rate(address, work, n, args, f"{n}") for n in (1, 2)}
            out["extract"] = {"model": args.model, "images": e[1]["images"],
                              "images_per_s_1": round(e[1]["images_per_s"], 2),
                              "images_per_s_2": round(e[2]["images_per_s"], 2),
                              "efficiency": round(e[2]["images_per_s"] / (2 * e[1]["images_per_s"]), 3),
                              # each replica over its own span: the second one's later start left out
                              "efficiency_replica_spans": round(e[2]["sum_of_replica_rates"] / (2 * e[1]["images_per_s"]), 3),
                              "replica_rates_2": e[2]["replicas"], "nodes_used_2": e[2]["nodes"],
                              "load_after": round(load(), 2)}
            print(f"extract: 1 replica {e[1]['images_per_s']:.1f} img/s | 2 replicas {e[2]['images_per_s']:.1f} img/s"
                  f" on {e[2]['nodes']} node(s) | efficiency {out['extract']['efficiency']:.2f}", file=sys.stderr)
    finally:
        ray.shutdown()
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    out["load_end"] = round(load(), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
