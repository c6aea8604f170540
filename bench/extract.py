"""Benchmark: `insight extract` against a plain loop of open_clip `encode_image`.

Same images (the bundled samples with augmented views), same model, same
threads, in one run. Prints images/s of each, their ratio and the bytes the
cache writes per token; the last stdout line is JSON.

    python bench/extract.py                 # ViT-B-16 (random init: no weights offline), 224 px
    python bench/extract.py --quick         # fewer images
    python bench/extract.py --model tiny    # the tiny test model

Steady-state throughput is measured for both: the plain loop after one warm-up
batch, insight from its workers' own shard timings (model build and Ray start
excluded, reported separately as wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from insight.runtime import offline_env

offline_env()
os.environ.setdefault("INSIGHT_LOG", "WARNING")

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg, paths: list[str], views: int, batch: int, threads: int) -> float:
    """images/s of open_clip's own preprocess + encode_image over the same images.

    Images are decoded before the clock starts (insight decodes inside its timing),
    so the comparison leans towards the plain loop.
    """
    import open_clip
    import torch
    from PIL import Image

    from insight.backbones.openclip import register_architecture

    torch.set_num_threads(threads)
    if cfg.backbone.architecture:
        register_architecture(cfg.backbone.model, cfg.backbone.architecture)
    torch.manual_seed(cfg.backbone.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg.backbone.model, pretrained=None, force_image_size=cfg.backbone.image_size)
    model.eval()
    images = [Image.open(p).convert("RGB") for p in paths for _ in range(views)]
    with torch.inference_mode():
        model.encode_image(torch.stack([preprocess(im) for im in images[:batch]]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            x = torch.stack([preprocess(im) for im in images[i : i + batch]])
            model.encode_image(x)
        return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'tiny'")
    ap.add_argument("--images", type=int, default=25)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.views = min(args.images, 8), min(args.views, 4)

    import ray

    from insight.cache.extract import extract
    from insight.config import load_config
    from insight.data import build_dataset

    work = Path(tempfile.mkdtemp(prefix="insight-bench-"))
    sets = [f"workdir={work}", f"data.max_images={args.images}", f"data.views={args.views}",
            f"extract.batch_size={args.batch}", f"extract.cpus_per_worker={args.threads}",
            f"cluster.num_cpus={args.threads}", "cache.shard_images=16"]
    if args.model != "tiny":
        sets += [f"backbone.model={args.model}", "backbone.architecture=null", "backbone.image_size=224"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    paths = [r.path for r in build_dataset(cfg.data, cfg.workdir).records]

    plain = plain_loop(cfg, paths, args.views, args.batch, args.threads)

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    res = extract(cfg, progress=False)
    wall = time.perf_counter() - t0
    shard_dir = Path(res["cache"]) / "shards"
    worker_s = sum(json.loads(p.read_text())["seconds"] for p in shard_dir.glob("*.json"))
    ray.shutdown()
    ours = res["images"] / worker_s
    out = {
        "bench": "extract", "model": args.model, "image_size": cfg.backbone.image_size,
        "images": res["images"], "threads": args.threads,
        "plain_open_clip_images_per_s": round(plain, 3),
        "insight_images_per_s": round(ours, 3),
        "ratio": round(ours / plain, 3),
        "insight_wall_s_incl_startup": round(wall, 2),
        "bytes_per_token": round(res["bytes_per_token"], 1),
        "dim": res["dim"], "dtype": cfg.cache.dtype,
    }
    print(f"plain open_clip encode_image: {plain:.2f} img/s | insight extract: {ours:.2f} img/s "
          f"(ratio {ours / plain:.2f}) | {res['bytes_per_token']:.0f} B/token", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
