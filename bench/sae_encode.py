"""Benchmark (not a test): SAE inference (threshold encode) against the matmul floor and the peers.

What serving and concept mining call is ``MatryoshkaSAE.encode`` (dense (B, M)
codes z = pre * 1[pre > theta]) and ``MatryoshkaSAE.encode_sparse`` (the same
codes as (row, concept, value) triples, the serving path's ``encode_sparse``).
Timed in one process, on the same weights, threshold and batch:

* ``matmul``: a plain (B, D) x (D, M) ``x @ W_enc`` - the floor any encoder pays;
* ``addmm (folded bias)``: the pre-activations alone, i.e. encode without its
  in-place threshold pass (where encode's time goes: matmul, bias, threshold);
* ``insight.encode`` and ``insight.encode_sparse``;
* ``dense+nonzero``: ``encode`` then the nonzeros of its output (what the
  sparse path did before it was fused);
* dictionary_learning 0.1.0 ``MatryoshkaBatchTopKSAE.encode`` (threshold
  inference, ``use_threshold=True``) with our weights copied in; when the
  package is not installed, a verbatim copy of its formula (see ``dl_formula``);
* sae-lens ``JumpReLUSAE.encode`` (what sae-lens turns a trained BatchTopK SAE
  into for inference) with theta as every concept's threshold, when installed.

Calls are interleaved (repeat r of every function before repeat r + 1 of any)
and the median is reported, with the load average. One intra-op thread by
default (as Ray gives a 1-CPU replica). Peers run in the bench venv of
``bench/sae_train.py``:

    PYTHONPATH=platform .bench-venv/bin/python bench/sae_encode.py            # B=4096, D=512, M=8192
    .venv/bin/python bench/sae_encode.py --quick                              # B=1024, D=256, M=4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from insight.config import SAEConfig  # noqa: E402
from insight.sae import MatryoshkaSAE  # noqa: E402
from insight.sae.model import batch_topk  # noqa: E402
from insight.sae.step import keep_freed_memory  # noqa: E402
from sae_train import PlantedStream, dictionary_learning_module  # noqa: E402


def dl_formula(x, w_enc, b_enc, b_dec, threshold, max_act_index):
    """dictionary_learning 0.1.0 ``MatryoshkaBatchTopKSAE.encode(x, use_threshold=True)``, verbatim ops."""
    post_relu_feat_acts_BF = torch.nn.functional.relu((x - b_dec) @ w_enc + b_enc)
    encoded_acts_BF = post_relu_feat_acts_BF * (post_relu_feat_acts_BF > threshold)
    encoded_acts_BF[:, max_act_index:] = 0
    return encoded_acts_BF


def dictionary_learning_encode(sae: MatryoshkaSAE) -> tuple[Callable, str]:
    """The peer's encode with our weights; falls back to the formula copy when not installed."""
    try:
        MatryoshkaBatchTopKSAE = dictionary_learning_module().MatryoshkaBatchTopKSAE  # noqa: N806
    except Exception as exc:  # not installed here: its formula, same ops
        w = (sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), sae.threshold.detach().float())
        why = f"formula copy ({type(exc).__name__})"
        return (lambda x: dl_formula(x, *w, sae.n_concepts)), why
    ae = MatryoshkaBatchTopKSAE(sae.d_in, sae.n_concepts, sae.k, list(sae.group_sizes)).to(sae.W_enc.device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(ae, name).copy_(getattr(sae, name))
        ae.threshold.copy_(sae.threshold)
    ae.to(sae.W_enc.dtype)
    return (lambda x: ae.encode(x, use_threshold=True)), "installed dictionary-learning"


def sae_lens_encode(sae: MatryoshkaSAE) -> Callable:
    """sae-lens' inference SAE for BatchTopK-trained weights (JumpReLU, per-concept threshold = theta)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    peer = JumpReLUSAE(
        JumpReLUSAEConfig(d_in=sae.d_in, d_sae=sae.n_concepts, dtype=dtype, device=str(sae.W_enc.device))
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(peer, name).copy_(getattr(sae, name))
        peer.threshold.fill_(float(sae.threshold))
    return peer.encode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B=1024, D=256, M=4096, 5 repeats (seconds)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--d-in", type=int, default=None)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peers", default="dictionary_learning,sae_lens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    d = args.d_in or (256 if args.quick else 512)
    batch = args.batch or (1024 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 9)
    m = args.expansion * d
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # process-wide: every function below gets it
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    print(f"# SAE inference benchmark ({'quick' if args.quick else 'full'})")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {dev.type} {gpu or platform.processor() or platform.machine()}, {args.dtype}"
    )
    load_start = os.getloadavg()[0]
    print(f"B={batch} D={d} M={m} k={args.k} repeats={repeats}; load average at start: {load_start:.2f}")

    data = PlantedStream(d, n_atoms=m // 2, active=8, seed=args.seed)
    sae = MatryoshkaSAE.from_config(d, SAEConfig(expansion=args.expansion, k=args.k), seed=args.seed, device=dev)
    with torch.no_grad():
        sae.init_from_batch(data.batch(0, batch).to(dev))
        # theta = the smallest value BatchTopK keeps on a calibration batch: about k codes per row
        _, kept = batch_topk(sae.pre_acts(data.batch(1, batch).to(dev)), args.k * batch)
        sae.threshold.fill_(float(kept.min()))
    sae = sae.to(dtype).eval()
    x = data.batch(2, batch).to(dev, dtype)

    def dense_then_nonzero(x_bd: torch.Tensor):
        z = sae.encode(x_bd)
        r, c = (z != 0).nonzero(as_tuple=True)
        return r, c, z[r, c]

    w = sae.W_enc.detach()
    bias = sae.folded_bias().detach()
    fns: dict[str, Callable] = {
        "matmul": lambda x_bd: x_bd @ w,
        "addmm (folded bias)": lambda x_bd: torch.addmm(bias, x_bd, w),  # encode less its threshold pass
        "insight.encode": sae.encode,
        "insight.encode_sparse": sae.encode_sparse,
        "dense+nonzero": dense_then_nonzero,
    }
    notes: dict[str, str] = {}
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    if "dictionary_learning" in wanted:
        fns["dictionary_learning"], notes["dictionary_learning"] = dictionary_learning_encode(sae)
    if "sae_lens" in wanted:
        try:
            fns["sae_lens"] = sae_lens_encode(sae)
            notes["sae_lens"] = "installed sae-lens JumpReLUSAE"
        except Exception as exc:
            notes["sae_lens"] = f"skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"

    with torch.no_grad():
        z = sae.encode(x)
        codes = sae.encode_sparse(x)
        checks = {"insight.encode_sparse": bool(torch.equal(codes.to_dense() != 0, z != 0))}
        # the peers round differently (x - b_dec first): codes within rounding of theta may flip, so
        # agreement = the same support on all but 0.1 % (bf16: 1 %) of the codes, equal values where both fire
        tol, max_flips = (1e-4, 1e-3) if dtype == torch.float32 else (5e-2, 1e-2)
        for name in ("dictionary_learning", "sae_lens"):
            if name in fns:
                zp = fns[name](x).float()
                both = (zp != 0) & (z != 0)
                flips = int(((zp != 0) ^ (z != 0)).sum())
                close = torch.allclose(zp[both], z.float()[both], atol=tol, rtol=tol)
                checks[name] = bool(close and flips <= max_flips * max(1, int(both.sum())))
        l0 = codes.nnz / batch
    print(f"codes per row (L0) {l0:.1f}; outputs agree with insight.encode: {checks}")
    for name, why in notes.items():
        print(f"  {name}: {why}")

    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            f(x)
        sync()
        for _ in range(repeats):
            for name, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f(x)
                sync()
                times[name].append(time.perf_counter() - t0)
    load_end = os.getloadavg()[0]
    med = {n: statistics.median(t) for n, t in times.items()}
    gflops = 2.0 * batch * d * m / med["matmul"] / 1e9
    print(f"\n{'function':<24}{'median ms':>11}{'min ms':>9}{'x matmul':>10}")
    for n, t in times.items():
        print(f"{n:<24}{1000 * med[n]:>11.1f}{1000 * min(t):>9.1f}{med[n] / med['matmul']:>10.3f}")
    best = {n: min(t) for n, t in times.items()}
    ratios = {
        "encode_over_matmul": med["insight.encode"] / med["matmul"],
        "encode_over_matmul_min": best["insight.encode"] / best["matmul"],
        "addmm_over_matmul": med["addmm (folded bias)"] / med["matmul"],
        "encode_sparse_over_encode": med["insight.encode_sparse"] / med["insight.encode"],
        "dense_nonzero_over_encode_sparse": med["dense+nonzero"] / med["insight.encode_sparse"],
    }
    for peer in ("dictionary_learning", "sae_lens"):
        if peer in med:
            ratios[f"{peer}_over_encode"] = med[peer] / med["insight.encode"]
            ratios[f"{peer}_over_encode_min"] = best[peer] / best["insight.encode"]
    print(f"plain matmul: {gflops:.1f} GFLOP/s")
    print(
        f"encode / matmul: {ratios['encode_over_matmul']:.3f} median, {ratios['encode_over_matmul_min']:.3f} best "
        f"(goal <= 1.05); of it the bias: addmm / matmul {ratios['addmm_over_matmul']:.3f}"
    )
    print(f"encode_sparse / encode: {ratios['encode_sparse_over_encode']:.3f}")
    print(f"(dense encode + nonzero) / encode_sparse: {ratios['dense_nonzero_over_encode_sparse']:.2f}x")
    for peer in ("dictionary_learning", "sae_lens"):
        if f"{peer}_over_encode" in ratios:
            print(
                f"{peer} encode / insight encode: {ratios[f'{peer}_over_encode']:.2f}x median, "
                f"{ratios[f'{peer}_over_encode_min']:.2f}x best  ({notes[peer]})"
            )
    print(f"load average at end: {load_end:.2f}")
    summary = {
        "bench": "sae_encode",
        "mode": "quick" if args.quick else "full",
        "shape": {"batch": batch, "d_in": d, "n_concepts": m, "k": args.k},
        "device": dev.type,
        "gpu": gpu,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "l0": round(l0, 2),
        "median_ms": {n: round(1000 * v, 2) for n, v in med.items()},
        "matmul_gflops": round(gflops, 1),
        "ratios": {n: round(v, 3) for n, v in ratios.items()},
        "agree": checks,
        "peers": notes,
        "loadavg": [round(load_start, 2), round(load_end, 2)],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
