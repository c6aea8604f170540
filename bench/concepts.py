"""Benchmark: the streaming concept-relation pass against a straightforward dense one.

Same cache, same SAE, same threads, in one run. For each dictionary size M:

* stream: `insight.concepts.stats.partial_stats` over every shard in one
  process (exactly what each Ray task of `insight concepts` runs): per-image
  codes, sparse active-pair accumulation of D in int64 fixed point, counts,
  top-N patches with their codes.
* dense: all tokens in memory, z (T, M) encoded in one go, A = 1[z > eps],
  D = z^T A as one float32 matmul, counts = A.sum(0), top-N by torch.topk over
  tokens.

Each runs in its own subprocess (``--repeats`` times, alternating, fastest
kept: the machine is shared) so that peak memory (ru_maxrss, which
includes the interpreter, torch and the loaded SAE: the "base" column) is its
own. The children save D; the parent checks that both give the same Dn and
counts. Data: synthetic patch grids (14 x 14) whose tokens are sums of k
random unit atoms of an M-atom dictionary with coefficients in [0.5, 2) plus
noise; the SAE is that dictionary with a threshold, so about k concepts fire
per token, as in a trained model. The last stdout line is JSON.

    python bench/concepts.py                          # M = 1024, 2048, 4096; T = 200,000 tokens
    python bench/concepts.py --sizes 1024 --tokens 50000
    python bench/concepts.py --dense-max 4096         # also the dense pass at M = 4096 (~10 GB peak)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("INSIGHT_LOG", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
GRID = 14


def rss_mb() -> float:
    """Current resident set size (MB) from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(folder: Path, tokens: int, dim: int, m: int, k: int, seed: int = 0) -> tuple[str, str]:
    """A cache of synthetic grids and the matching thresholded SAE checkpoint."""
    import numpy as np
    import torch

    from insight.cache.importer import import_features
    from insight.sae import MatryoshkaSAE, save_sae

    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(m, dim)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n_img = max(1, tokens // (GRID * GRID))
    grids = np.lib.format.open_memmap(folder / "grids.npy", mode="w+", dtype=np.float32,
                                      shape=(n_img, GRID, GRID, dim))
    per = 32  # images per generation chunk (bounds the (b, k, D) temporary)
    for s in range(0, n_img, per):
        b = min(per, n_img - s) * GRID * GRID
        idx = rng.integers(0, m, size=(b, k))
        coef = rng.uniform(0.5, 2.0, size=(b, k)).astype(np.float32)
        x = np.einsum("bk,bkd->bd", coef, atoms[idx]) + rng.normal(scale=0.05, size=(b, dim)).astype(np.float32)
        grids[s : s + b // (GRID * GRID)] = x.reshape(-1, GRID, GRID, dim)
    grids.flush()
    cache = import_features(str(folder / "grids.npy"), str(folder / "cache"), shard_images=256)["cache"]
    sae = MatryoshkaSAE(dim, m, [m], k=k, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(atoms))
        sae.W_enc.copy_(torch.from_numpy(atoms.T.copy()))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sample_nd = torch.from_numpy(np.load(folder / "grids.npy", mmap_mode="r")[:8].reshape(-1, dim).copy())
        pre = (sample_nd @ sae.W_enc).flatten()
        theta = torch.quantile(pre[torch.randperm(pre.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                               1.0 - k / m)  # about k concepts above theta per token, as trained models have
        sae.threshold.fill_(float(theta))
    ckpt = save_sae(folder / "sae", sae, {}, None, 0)
    (folder / "grids.npy").unlink()
    return cache, str(ckpt)


def child(impl: str, cache: str, ckpt: str, out: str, threads: int, top_n: int, eps: float, radius: int) -> dict:
    """One implementation in this process; returns timings and memory, saves D as float64."""
    import numpy as np
    import torch

    from insight.cache import CacheReader
    from insight.concepts.stats import FIXED_SCALE, encode_tokens, partial_stats
    from insight.sae import load_sae

    torch.set_num_threads(threads)
    sae = load_sae(ckpt).eval()
    reader = CacheReader(cache)
    base = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    stages: dict[str, float] = {}
    if impl == "stream":
        st = partial_stats(reader, range(len(reader.manifest.shards)), sae, eps=eps, radius=radius, top_n=top_n)
        seconds = time.perf_counter() - t0
        stages = dict(st.stage_seconds)
        d_mm = st.cooc_mm / FIXED_SCALE
        count = st.count_m
        tokens = st.tokens
        st.mean_vectors()  # part of the step's work, after the pass
    else:
        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            stages[name] = now - since
            return now

        x_nd = torch.from_numpy(np.concatenate([reader.read_shard(s)[1].reshape(-1, reader.manifest.dim)
                                                for s in reader.manifest.shards]))
        t = lap("read", t0)
        with torch.no_grad():
            z_tm = encode_tokens(sae, x_nd)
            t = lap("encode", t)
            a_tm = (z_tm > eps).to(torch.float32)
            t = lap("threshold", t)
            d_mm = (z_tm.T @ a_tm).double().numpy()
            t = lap("product", t)
            count = a_tm.sum(0).long().numpy()
            t = lap("counts", t)
            torch.topk(z_tm, top_n, dim=0)
            lap("top", t)
        seconds = time.perf_counter() - t0
        tokens = x_nd.shape[0]
    cpu = time.process_time() - c0
    np.save(out, d_mm)
    np.save(out.replace(".npy", "-count.npy"), count)
    return {"impl": impl, "threads": threads, "seconds": seconds, "cpu_seconds": cpu, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "l0": float(count.sum() / tokens),
            "stages": {k: round(v, 3) for k, v in stages.items()},
            "base_rss_mb": base, "peak_rss_mb": peak_mb(), "pass_peak_mb": peak_mb() - base}


def run_child(impl: str, cache: str, ckpt: str, out: str, threads: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--cache", cache, "--ckpt", ckpt, "--out", out,
           "--threads", str(threads), "--top-n", str(args.top_n), "--radius", str(args.radius)]
    load_before = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"impl": impl, "threads": threads, "error": (p.stderr or p.stdout)[-1500:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["load_avg"] = [load_before, os.getloadavg()[0]]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096", help="Dictionary sizes M, comma separated.")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=12, help="Atoms per token (about the active concepts).")
    ap.add_argument("--top-n", type=int, default=30)
    ap.add_argument("--radius", type=int, default=0)
    ap.add_argument("--threads", default="1,2", help="Torch threads, comma separated (each a row).")
    ap.add_argument("--dense-max", type=int, default=2048, help="Largest M the dense pass runs at (memory).")
    ap.add_argument("--repeats", type=int, default=2,
                    help="Runs of each implementation, alternating; the fastest counts (the machine is shared).")
    ap.add_argument("--tmp", help="Folder for the synthetic cache (default: the system's temporary folder).")
    ap.add_argument("--child", choices=["stream", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.ckpt, args.out, int(args.threads), args.top_n, 1e-3,
                               args.radius)))
        return
    results = []
    load_start = os.getloadavg()[0]
    for m in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-concepts-", dir=args.tmp) as tmp:
            folder = Path(tmp)
            cache, ckpt = make_data(folder, args.tokens, args.dim, m, args.k)
            for threads in [int(t) for t in str(args.threads).split(",")]:
                results.append(measure(m, threads, cache, ckpt, folder, args))
    print(json.dumps({"bench": "concepts", "tokens": args.tokens, "dim": args.dim, "k": args.k, "grid": [GRID, GRID],
                      "top_n": args.top_n, "radius": args.radius, "cpu": platform.processor() or platform.machine(),
                      "torch": __import__("torch").__version__,
                      "load_avg": [load_start, os.getloadavg()[0]], "results": results}))


def measure(m: int, threads: int, cache: str, ckpt: str, folder: Path, args: argparse.Namespace) -> dict:
    """Both implementations at one M and thread count, alternating; the fastest run of each counts."""
    import numpy as np

    row: dict = {"M": m, "threads": threads}
    impls = ["stream"] + (["dense"] if m <= args.dense_max and args.radius == 0 else [])
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl in impls:
            res = run_child(impl, cache, ckpt, str(folder / f"{impl}.npy"), threads, args)
            runs[impl].append(res)
            sys.stderr.write(f"[bench] M={m} threads={threads} {impl}: {json.dumps(res)[:400]}\n")
    for impl, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        row[impl] = min(ok, key=lambda r: r["seconds"]) if ok else rs[0]
        row[impl]["all_seconds"] = [round(r.get("seconds", float("nan")), 2) for r in rs]
        row[impl]["all_cpu_seconds"] = [round(r.get("cpu_seconds", float("nan")), 2) for r in rs]
    both = all((folder / f"{impl}{end}.npy").is_file() for impl in ("stream", "dense") for end in ("", "-count"))
    if "dense" in row and "error" not in row["dense"] and "error" not in row["stream"] and both:
        ds, dd = np.load(folder / "stream.npy"), np.load(folder / "dense.npy")
        diag_s, diag_d = np.diag(ds), np.diag(dd)
        dn_s = np.where(diag_s[:, None] > 0, ds / np.maximum(diag_s, 1e-30)[:, None], 0)
        dn_d = np.where(diag_d[:, None] > 0, dd / np.maximum(diag_d, 1e-30)[:, None], 0)
        row["max_abs_dn_diff"] = float(np.abs(dn_s - dn_d).max())
        row["counts_equal"] = bool(np.array_equal(np.load(folder / "stream-count.npy"),
                                                  np.load(folder / "dense-count.npy")))
        row["speedup"] = row["stream"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
        row["cpu_speedup"] = min(row["dense"]["all_cpu_seconds"]) / min(row["stream"]["all_cpu_seconds"])
        row["peak_ratio"] = row["dense"]["pass_peak_mb"] / max(1.0, row["stream"]["pass_peak_mb"])
    s = row["stream"]
    if "error" not in s:
        line = (f"M={m} threads={threads}: stream {s['tokens_per_s']:,.0f} tok/s ({s['seconds']:.2f} s, "
                f"cpu {s['cpu_seconds']:.2f} s, pass peak {s['pass_peak_mb']:.0f} MB, stages {s['stages']})")
        if "speedup" in row:
            d = row["dense"]
            line += (f"; dense {d['tokens_per_s']:,.0f} tok/s ({d['seconds']:.2f} s, cpu {d['cpu_seconds']:.2f} s, "
                     f"pass peak {d['pass_peak_mb']:.0f} MB, stages {d['stages']}); speed-up {row['speedup']:.2f}x "
                     f"(cpu {row['cpu_speedup']:.2f}x), max |dDn| {row['max_abs_dn_diff']:.1e}, "
                     f"counts equal {row['counts_equal']}")
        sys.stderr.write(f"[bench] {line}; load {os.getloadavg()}\n")
    return row


if __name__ == "__main__":
    main()
