"""Benchmark: the served /v1/explain against the same work done in-process, and batching's gain.

One run, one machine, loopback only:

1. latency: one client for T seconds, alternating a served request, the
   same work in-process (decode, centre view, model, render, JSON) and a
   ``GET /healthz`` -> served p50/p95/p99, in-process p50; overhead ratio =
   served p50 / in-process p50. Where the served time goes: the medians of
   the stages the ingress reports in its ``Server-Timing`` header (route, read,
   decode, model call, of it the model replica's time and its compute,
   render, JSON, the app's whole time), the in-process stages, and what is
   left outside the app (the client, the HTTP proxy and its hop to the
   ingress replica; ``/healthz``, which never calls the model, is that
   floor). Paired by request, latency less the request's own model compute,
   served minus in-process, is Serve's fixed cost without the compute's
   noise; ``paired_overhead_ratio`` = 1 + that / in-process p50;
2. load: N concurrent clients, T seconds with ``serve.max_batch_size``
   batching and T seconds with max_batch_size 1, in alternating rounds
   (changed in place through the deployment's user_config, no model reload)
   -> p50/p95/p99, throughput, errors of each; batching gain =
   throughput(batched) / throughput(1).

Alternating keeps both sides of each comparison under the same machine load
(the machine is shared; its load average is printed with the figures).

The model is the tiny test profile's SAE, trained here in seconds on the
bundled images (``--model`` takes a checkpoint folder or models:/ ref instead).
Both the replica and the in-process engine run torch on one thread. Requests
are small PNGs of the bundled images; errors are non-200 answers or failed
connections.

    python bench/serve_load.py                      # tiny model, 8 clients, 15 s phases
    python bench/serve_load.py --quick              # 4 clients, 4 s phases; one JSON line only
    python bench/serve_load.py --profile vit-b16    # the reference backbone's compute (random init)
    python bench/serve_load.py --latency-only       # only the 1-client ratio and where its time goes
    python bench/serve_load.py --format png         # heatmaps as PNGs, served and in-process alike
    python bench/serve_load.py --num-gpus 1         # the model replica on a GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import asyncio
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
PROFILES = {
    "tiny": (),
    "vit-b16": ("backbone.model=ViT-B-16", "backbone.architecture=null", "backbone.image_size=224",
                "sae.expansion=8", "tasks.crop=224", "tasks.stride=112"),
}
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402


def train_tiny_model(root: Path, steps: int = 40, overrides: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder for bench/serve_load.py (which serves a folder, not a registered model):
    a real Matryoshka SAE on the tiny backbone's features of the bundled images (2 views each).

    Trains in-process with the library's own step (a benchmark needs a model, not the pipeline);
    past ``sae.threshold_start_step`` so inference uses the learned theta.
    ``overrides`` (--set style) change the profile, e.g. a random-init ViT-B-16 for benchmarks.
    """
    import torch

    from insight.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"workdir={root}", *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, more threads only spin against other processes
    try:
        return _train(cfg, root, steps)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, root: Path, steps: int) -> Path:
    import torch

    from insight.backbones import build_backbone
    from insight.data.samples import sample_images
    from insight.data.transforms import Preprocessor
    from insight.sae import MatryoshkaSAE, make_optimizer, save_sae, train_step

    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone)
    pre = Preprocessor(backbone.image_size, backbone.mean, backbone.std, cfg.data.augment)
    views = [pre(rgb, name, v) for name, rgb in sorted(sample_images().items()) for v in range(2)]
    feats = torch.cat([backbone.encode_patches(torch.from_numpy(np.stack(views[i : i + 32])))
                       for i in range(0, len(views), 32)])
    tokens = feats.reshape(-1, feats.shape[-1])
    sae = MatryoshkaSAE.from_config(tokens.shape[1], cfg.sae, seed=0)
    sae.init_from_batch(tokens[:2048])
    opt = make_optimizer(sae, cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(tokens), (cfg.train.batch_size,), generator=gen)
        train_step(sae, opt, tokens[idx], cfg.sae, step)
    assert float(sae.threshold) > 0, "the tiny SAE never learned its inference threshold"
    return save_sae(root / "model" / "sae", sae, cfg.to_dict(), step=steps)


def percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(lat_s) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)}


def images(size: int) -> list[bytes]:
    from serving import sample_png

    return [sample_png(n, size or None) for n in ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse")]


def server_timing(header: str) -> dict[str, float]:
    """``name;dur=1.23, ...`` -> {name: ms}."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: round(float(np.median([r[k] for r in rows if k in r])), 2) for k in sorted(keys)}


def interleaved_latency(url: str, engine, payloads: list[bytes], seconds: float, top_k: int,
                        fmt: str) -> tuple[dict, dict, dict]:
    """One client: a served request, the same work in-process and a ``/healthz``, in turn, for ``seconds``.

    Alternating puts all under the same machine load (this machine is shared), so the ratio
    compares like with like. In-process = decode -> view -> model -> render -> JSON, exactly
    the ingress's and the replica's work without Serve in between.
    Returns (served, in-process, breakdown): the breakdown holds the median of each stage.
    """
    import httpx
    from serve.images import center_view, decode_image

    from serve import render

    def local(data: bytes) -> tuple[bytes, dict[str, float]]:
        t0 = time.perf_counter()
        img = decode_image(data, 40_000_000, engine.image_size)
        view = center_view(img, engine.image_size)
        t1 = time.perf_counter()
        raw = engine.explain_batch([view.pixels], [top_k])[0]
        t2 = time.perf_counter()
        answer = {"concepts": render.explain_answer(raw, fmt), "view": view.box}
        if fmt == "packed":
            answer["heatmaps"] = render.packed_heatmaps(raw.maps)
        t3 = time.perf_counter()
        body = json.dumps(answer).encode()
        t4 = time.perf_counter()
        return body, {"decode": (t1 - t0) * 1e3, "model": (t2 - t1) * 1e3, "compute": raw.compute_ms,
                      "render": (t3 - t2) * 1e3, "json": (t4 - t3) * 1e3}

    served_lat, local_lat, health_lat, errors = [], [], [], 0
    stages, local_stages, outside, served_rest, local_rest = [], [], [], [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        def remote(data: bytes) -> dict[str, float] | None:
            try:
                r = c.post(f"/v1/explain?top_k={top_k}&format={fmt}", content=data,
                           headers={"Content-Type": "image/png"})
                return server_timing(r.headers.get("server-timing", "")) if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        for data in payloads:  # warm-up both paths
            remote(data)
            local(data)
            c.get("/healthz")
        i, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            data = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            timing = remote(data)
            t1 = time.perf_counter()
            local_stages.append(local(data)[1])
            t2 = time.perf_counter()
            health_ok = c.get("/healthz").status_code == 200
            t3 = time.perf_counter()
            if timing is not None:
                served_lat.append(t1 - t0)
                stages.append(timing)
                if "app" in timing:
                    outside.append((t1 - t0) * 1e3 - timing["app"])
                if "compute" in timing:  # the same request's latency less its own model compute
                    served_rest.append((t1 - t0) * 1e3 - timing["compute"])
            else:
                errors += 1
            local_rest.append((t2 - t1) * 1e3 - local_stages[-1]["compute"])
            if health_ok:
                health_lat.append(t3 - t2)
            local_lat.append(t2 - t1)
            i += 1
    served = {**percentiles(served_lat), "requests": len(served_lat), "errors": errors}
    served_stages = medians(stages)
    if "model" in served_stages and "replica" in served_stages:  # the handle call's own cost, per request
        served_stages["handle"] = round(float(np.median([s["model"] - s["replica"] for s in stages
                                                          if "model" in s and "replica" in s])), 2)
    breakdown = {"served_stages_ms": served_stages,
                 "outside_app_ms": round(float(np.median(outside)), 2) if outside else None,
                 "healthz_p50_ms": percentiles(health_lat)["p50_ms"],
                 "in_process_stages_ms": medians(local_stages)}
    if served_rest:
        # Paired by request: latency less that request's own compute, served and in-process. Their
        # difference is Serve's fixed cost, free of the compute's noise (a busy machine makes a
        # ViT-B-16 forward vary by seconds, which swamps a ratio of two p50s).
        fixed = float(np.median(served_rest) - np.median(local_rest))
        breakdown["served_less_compute_ms"] = round(float(np.median(served_rest)), 2)
        breakdown["in_process_less_compute_ms"] = round(float(np.median(local_rest)), 2)
        breakdown["fixed_overhead_ms"] = round(fixed, 2)
        breakdown["paired_overhead_ratio"] = round(1.0 + fixed / float(np.median(local_lat) * 1e3), 3)
    return served, {**percentiles(local_lat), "requests": len(local_lat)}, breakdown


async def load(url: str, payloads: list[bytes], clients: int, seconds: float, top_k: int, fmt: str) -> dict:
    """``clients`` concurrent keep-alive clients posting raw PNGs for ``seconds``."""
    import httpx

    lat: list[float] = []
    errors = 0
    t_end = time.perf_counter() + seconds  # reset after the warm-up
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def client(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await c.post(f"/v1/explain?top_k={top_k}&format={fmt}", content=payloads[i % len(payloads)],
                                     headers={"Content-Type": "image/png"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += 1

        for k in range(clients):  # warm-up: one request per client connection
            await c.post(f"/v1/explain?top_k={top_k}&format={fmt}", content=payloads[k % len(payloads)],
                         headers={"Content-Type": "image/png"})
        t0 = time.perf_counter()
        t_end = t0 + seconds
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": lat, "errors": errors, "wall_s": wall}


def merge(parts: list[dict]) -> dict:
    """Rounds of one setting -> percentiles over all their requests, throughput over their summed time."""
    lat = [x for p in parts for x in p["latencies"]]
    wall = sum(p["wall_s"] for p in parts)
    return {**percentiles(lat), "requests": len(lat), "errors": sum(p["errors"] for p in parts),
            "throughput_rps": round(len(lat) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 clients, 4 s phases; print one JSON line only.")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="Length of each phase.")
    ap.add_argument("--model", default=None, help="Checkpoint folder or models:/ ref (default: train the tiny one).")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="tiny",
                    help="tiny: the test profile (7x7 grid, D=64); vit-b16: a random-init ViT-B-16 at 224 px "
                         "(14x14 grid, D=512, M=4096), i.e. the reference model's compute without its weights.")
    ap.add_argument("--size", type=int, default=0, help="Long side of the request images (0: as bundled, ~512 px).")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--format", choices=("packed", "png", "raw"), default="packed",
                    help="Heatmap format asked for (served and in-process alike); packed is the API's default.")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray.")
    ap.add_argument("--latency-only", action="store_true", help="Only the 1-client latency phase (no load phases).")
    ap.add_argument("--num-gpus", type=float, default=0.0,
                    help="GPUs per model replica (serve.num_gpus); the in-process engine uses a visible GPU too.")
    args = ap.parse_args()
    clients = args.clients or (4 if args.quick else 8)
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    rounds = 2 if args.quick else 3
    say = (lambda *a: None) if args.quick else (lambda *a: print(*a, file=sys.stderr, flush=True))

    import ray
    import torch
    from ray import serve
    from serve.app import build_app
    from serve.engine import Engine, ModelLoader

    from insight.localcluster import free_port

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    t_setup = time.perf_counter()
    model = args.model or str(train_tiny_model(work, overrides=PROFILES[args.profile]))
    torch.set_num_threads(1)
    payloads = images(args.size)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_cfg = {"max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s, "num_cpus": 1,
                 "ingress_cpus": 0.5, "num_gpus": args.num_gpus}

    def deploy(max_batch_size: int) -> None:
        serve.run(build_app({"model": model, "tracking_uri": args.tracking_uri, "config": str(ROOT / "configs/tiny.yaml"),
                             "set": [f"workdir={work}"], "serve": {**serve_cfg, "max_batch_size": max_batch_size}}),
                  name="insight", route_prefix="/")

    try:
        deploy(args.max_batch_size)
        setup_s = time.perf_counter() - t_setup
        load_start = [round(x, 2) for x in os.getloadavg()]
        say(f"setup {setup_s:.1f}s; load average {load_start}")
        engine = Engine(ModelLoader(model, args.tracking_uri)(), threads=1)

        served_1, local, breakdown = interleaved_latency(url, engine, payloads, seconds, args.top_k, args.format)
        say("served, 1 client:", served_1)
        say("in-process (interleaved with it):", local)
        say("where the time goes (medians, ms):", breakdown)
        # Batched and unbatched load in alternating rounds (user_config changes in place, the model
        # stays loaded), so a change of the machine's load hits both alike.
        runs: dict[int, list[dict]] = {args.max_batch_size: [], 1: []}
        for _ in range(0 if args.latency_only else rounds):
            for mbs in (args.max_batch_size, 1):
                deploy(mbs)
                runs[mbs].append(asyncio.run(load(url, payloads, clients, seconds / rounds, args.top_k, args.format)))
        if not args.latency_only:
            batched, unbatched = merge(runs[args.max_batch_size]), merge(runs[1])
            say(f"served, {clients} clients, max_batch_size {args.max_batch_size}:", batched)
            say(f"served, {clients} clients, max_batch_size 1:", unbatched)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "endpoint": "/v1/explain", "model": args.model or args.profile, "image_px": args.size or "bundled",
        "top_k": args.top_k, "format": args.format, "seconds_per_phase": seconds, "clients": clients,
        "served_1_client": served_1, "in_process": local,
        "overhead_ratio": round(served_1["p50_ms"] / local["p50_ms"], 3), "breakdown": breakdown,
        "num_gpus": args.num_gpus, "errors": served_1["errors"], "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "setup_s": round(setup_s, 1),
    }
    if not args.latency_only:
        result.update({
            "served_load": {**batched, "max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_s},
            "served_load_unbatched": unbatched,
            "batching_gain": round(batched["throughput_rps"] / max(unbatched["throughput_rps"], 1e-9), 3),
            "errors": served_1["errors"] + batched["errors"] + unbatched["errors"], "rounds": rounds,
        })
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
