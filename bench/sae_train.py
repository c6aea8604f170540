"""Benchmark (not a test): SAE training-step throughput and quality against the peers.

Compares, in one process on the same planted sparse data and configuration
(reference: D=512, M=8192, k=12, the 6 reference groups, batch 4096 tokens,
Adam lr 1e-4, grad clip 1.0, fp32):

* ours: ``insight.sae.train_step``;
* dictionary_learning 0.1.0 (PyPI ``dictionary-learning``): the authors'
  ``MatryoshkaBatchTopKTrainer.update``;
* sae-lens (PyPI ``sae-lens``): ``MatryoshkaBatchTopKTrainingSAE`` driven by a
  copy of the body of sae-lens' ``SAETrainer._train_step`` (forward, fired
  bookkeeping, backward, clip 1.0, Adam), since its trainer wants a
  language-model activation store.

Steps are interleaved (step i of every implementation runs on batch i before
step i + 1 of any), so a busy machine slows all of them alike. Reported:
tokens/s (first ``--warmup`` steps excluded), FVU on a held-out batch after the
same number of tokens (BatchTopK codes), executed GFLOP/s as a fraction of a
plain fp32 (B, D) x (D, M) matmul measured in the same run, and ratios.

The peers need their own venv (they pull transformers, datasets, wandb, ...):

    python -m venv .bench-venv
    .bench-venv/bin/pip install -c constraints.txt torch==2.14.1 \\
        dictionary-learning==0.1.0 sae-lens==6.54.12 pydantic pyyaml safetensors
    PYTHONPATH=platform .bench-venv/bin/python bench/sae_train.py [--quick]

A peer that does not import is reported (with the error) and skipped.

AuxK variant: at the default dead window (10M tokens) no concept is ever dead
in a run this short, so nobody's auxiliary loss is timed. ``--dead-tokens N``
sets every implementation's window to N tokens (``--dead-tokens 4096``: one
batch without firing), so each one pays for AuxK on every step; the mean
number of dead concepts per step is printed for each.

On a GPU: ``--device cuda`` (and ``--autocast bf16`` for bf16 autocast of
every implementation's step and of the matmul reference); timings synchronise
the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from insight.config import REFERENCE_FRACTIONS, SAEConfig  # noqa: E402
from insight.sae import MatryoshkaSAE, make_optimizer, train_step  # noqa: E402
from insight.sae.metrics import fvu  # noqa: E402
from insight.sae.model import batch_topk, group_sizes_from_fractions  # noqa: E402
from insight.sae.sparse import dense_decode_groups, sparse_decode_groups  # noqa: E402
from insight.sae.step import keep_freed_memory  # noqa: E402

VENV_HINT = (
    "python -m venv .bench-venv && .bench-venv/bin/pip install -c constraints.txt torch==2.14.1 "
    "dictionary-learning==0.1.0 sae-lens==6.54.12 pydantic pyyaml safetensors && "
    "PYTHONPATH=platform .bench-venv/bin/python bench/sae_train.py --quick"
)


# ----------------------------------------------------------------------- data


class PlantedStream:
    """Tokens = sparse non-negative mixtures of a random unit dictionary, plus noise.

    Atom frequencies follow a power law (a few common atoms, a long tail), the
    regime a nested dictionary is meant for. Batch i is a pure function of
    (seed, i), so every implementation sees the same tokens.
    """

    def __init__(self, d_in: int, n_atoms: int, active: int, seed: int, noise: float = 0.05) -> None:
        gen = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d_in, generator=gen)
        self.atoms_ad = atoms / atoms.norm(dim=1, keepdim=True)
        rank = torch.arange(n_atoms, dtype=torch.float64)
        self.probs_a = (1.0 / (rank + 10.0) ** 0.8).float()
        self.active = active
        self.noise = noise
        self.seed = seed

    def batch(self, i: int, size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        idx_ba = torch.multinomial(self.probs_a, size * self.active, replacement=True, generator=gen)
        coef_ba = 0.5 + torch.rand(size * self.active, generator=gen) * 1.5
        x_bd = F.embedding_bag(
            idx_ba.view(size, self.active), self.atoms_ad, mode="sum", per_sample_weights=coef_ba.view(size, -1)
        )
        return x_bd + self.noise * torch.randn(size, x_bd.shape[1], generator=gen)


# -------------------------------------------------------------- implementations


def dictionary_learning_module() -> Any:
    """dictionary_learning's Matryoshka module, also where its package ``__init__`` cannot import.

    Its ``__init__`` files import every trainer and the activation buffer (nnsight,
    transformers, ...); the Matryoshka trainer needs torch and einops only. Where
    the full import fails (a bare GPU image with the wheel installed --no-deps),
    the two packages are registered without running their ``__init__``.
    """
    import importlib
    import importlib.util
    import types

    name = "dictionary_learning.trainers.matryoshka_batch_top_k"
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None or not spec.submodule_search_locations:
            raise
        root = Path(next(iter(spec.submodule_search_locations)))
        for pkg, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
        return importlib.import_module(name)


class Impl:
    name = "?"
    flops_per_token = 0.0  # executed FLOPs of one training step per token (matmul-level terms)
    dead: list[int]  # concepts counted dead by the implementation at each step (AuxK ran when > 0)

    def step(self, x_bd: torch.Tensor, i: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x_bd: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Ours(Impl):
    name = "insight"

    def __init__(
        self, d: int, expansion: int, k: int, lr: float, first_bd: torch.Tensor, seed: int, dead_tokens: int
    ) -> None:
        self.cfg = SAEConfig(expansion=expansion, k=k, dead_tokens=dead_tokens)
        self.sae = MatryoshkaSAE.from_config(d, self.cfg, seed=seed, device=first_bd.device)
        self.sae.init_from_batch(first_bd)
        self.dead = []
        self.opt = make_optimizer(self.sae, lr)
        m = expansion * d
        # dense encoder matmul; the rest touches the k*B kept entries only
        # (decode fwd 2kD, its backward 4kD, encoder backward 2kD)
        self.flops_per_token = 2.0 * d * m + 8.0 * k * d

    def step(self, x_bd: torch.Tensor, i: int) -> None:
        out = train_step(self.sae, self.opt, x_bd, self.cfg, i, grad_clip=1.0)
        self.dead.append(round(out["dead_fraction"] * self.sae.n_concepts))

    @torch.no_grad()
    def reconstruct(self, x_bd: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(self.sae.encode_batchtopk(x_bd, keep_pre_acts=False))


class DictionaryLearning(Impl):
    name = "dictionary_learning"

    def __init__(self, d: int, m: int, k: int, lr: float, steps: int, seed: int, dead_tokens: int, device: str) -> None:
        self.trainer = dictionary_learning_module().MatryoshkaBatchTopKTrainer(
            steps=steps,
            activation_dim=d,
            dict_size=m,
            k=k,
            layer=0,
            lm_name="bench",
            group_fractions=list(REFERENCE_FRACTIONS),
            lr=lr,
            warmup_steps=0,
            seed=seed,
            device=device,
        )
        self.trainer.dead_feature_threshold = dead_tokens  # the trainer's window, in tokens
        self.dead = []
        # dense: enc fwd 2DM, dec fwd 2DM; bwd enc wgrad 2DM, dec wgrad 2DM, dec dgrad 2DM
        self.flops_per_token = 10.0 * d * m

    def step(self, x_bd: torch.Tensor, i: int) -> None:
        self.trainer.update(i, x_bd)
        self.dead.append(int(self.trainer.dead_features))

    @torch.no_grad()
    def reconstruct(self, x_bd: torch.Tensor) -> torch.Tensor:
        ae = self.trainer.ae
        return ae.decode(ae.encode(x_bd, use_threshold=False))


class SAELens(Impl):
    name = "sae_lens"

    def __init__(
        self, d: int, m: int, k: int, lr: float, batch: int, dead_tokens: int, prefix_ends: list[int], device: str
    ) -> None:
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput

        self.TrainStepInput = TrainStepInput
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d,
            d_sae=m,
            k=k,
            matryoshka_widths=list(prefix_ends),
            aux_loss_coefficient=1 / 32,
            dtype="float32",
            device=device,
        )
        self.sae = MatryoshkaBatchTopKTrainingSAE(cfg)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(m, device=device)
        self.act_freq = torch.zeros(m, device=device)
        self.dead_window = max(1, dead_tokens // batch)  # its dead window counts forward passes
        self.dead = []
        inner = prefix_ends[-2] if len(prefix_ends) > 1 else 0
        # enc fwd 2DM, full dec fwd 2DM, inner prefix decodes 2D*W_inner; bwd: enc wgrad 2DM,
        # full dec 4DM, inner decodes 4D*W_inner
        self.flops_per_token = 10.0 * d * m + 6.0 * d * inner

    def step(self, x_bd: torch.Tensor, i: int) -> None:
        sae = self.sae
        sae.train()
        dead_mask = (self.since_fired > self.dead_window).bool()
        self.dead.append(int(dead_mask.sum()))
        out = sae.training_forward_pass(
            step_input=self.TrainStepInput(
                sae_in=x_bd,
                dead_neuron_mask=dead_mask,
                coefficients={},
                n_training_steps=i,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
            self.act_freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()

    @torch.no_grad()
    def reconstruct(self, x_bd: torch.Tensor) -> torch.Tensor:
        acts, _ = self.sae.encode_with_hidden_pre(x_bd)
        return self.sae.decode(acts)


# ------------------------------------------------------------------- helpers


def best_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_paths(b: int, d: int, m: int, k: int, reps: int) -> dict[str, float]:
    """Forward + backward ms of the sparse and dense group decodes at these shapes."""
    sae = MatryoshkaSAE(d, m, group_sizes_from_fractions(m, REFERENCE_FRACTIONS), k, seed=0)
    x = torch.randn(b, d)
    codes = sae.encode_batchtopk(x)
    grad = torch.randn(sae.n_groups, b, d)

    def run(path: str) -> None:
        vals = codes.values.detach().clone().requires_grad_(True)
        codes.values = vals
        w = sae.W_dec.detach().clone().requires_grad_(True)
        if path == "sparse":
            out = sparse_decode_groups(codes, w, sae.group_ends)
        else:
            out = dense_decode_groups(codes.to_dense(), w, sae.group_ends)
        out.backward(grad)

    return {p: 1000 * best_time(lambda p=p: run(p), reps) for p in ("sparse", "dense")}


def selection_paths(b: int, d: int, m: int, k: int, reps: int) -> dict[str, float]:
    """ms of BatchTopK selection: torch.topk over the flat (B, M) matrix vs ours."""
    pre = torch.randn(b, d) @ (torch.randn(d, m) / math.sqrt(d))
    n = k * b
    return {
        "flat_topk": 1000 * best_time(lambda: torch.topk(pre.view(-1), n, sorted=False), reps),
        "chunked": 1000 * best_time(lambda: batch_topk(pre, n), reps),
    }


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few steps (a few minutes on 2 cores)")
    ap.add_argument("--d-in", type=int, default=None)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default="dictionary_learning,sae_lens")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--dead-tokens",
        type=int,
        default=None,
        help="dead window of every implementation, in tokens (default: the config's 10M, never reached here); "
        "4096 = one batch, so that every implementation runs AuxK on every step",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-extras", action="store_true", help="skip the decode and selection kernel comparisons")
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off", help="bf16 autocast around every step")
    args = ap.parse_args(argv)

    d = args.d_in or (256 if args.quick else 512)
    batch = args.batch or (1024 if args.quick else 4096)
    steps = args.steps or (30 if args.quick else 60)
    m = args.expansion * d
    k = args.k
    dev = torch.device(args.device)
    dead_tokens = args.dead_tokens or SAEConfig().dead_tokens
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast_on = args.autocast == "bf16"

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_on)

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # process-wide: every implementation below gets it
    torch.manual_seed(args.seed)

    print(f"# SAE training-step benchmark ({'quick' if args.quick else 'full'})")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"device {dev.type}: {gpu or platform.processor() or platform.machine()}"
    )
    print(
        f"D={d} M={m} k={k} groups={group_sizes_from_fractions(m, REFERENCE_FRACTIONS)} batch={batch} "
        f"steps={steps} (timed: {steps - args.warmup}) lr={args.lr} "
        f"{'bf16 autocast' if autocast_on else 'fp32'} dead window {dead_tokens:,} tokens"
    )
    print(f"peer venv: {VENV_HINT}")
    load_start = os.getloadavg()[0]
    print(f"load average at start: {load_start:.2f} (other processes share these cores; steps are interleaved)")

    data = PlantedStream(d, n_atoms=m // 2, active=8, seed=args.seed)
    first = data.batch(0, batch).to(dev)
    held_out = data.batch(10**6, batch).to(dev)

    impls: list[Impl] = [Ours(d, args.expansion, k, args.lr, first, args.seed, dead_tokens)]
    missing: dict[str, str] = {}
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    prefix_ends = torch.tensor(group_sizes_from_fractions(m, REFERENCE_FRACTIONS)).cumsum(0).tolist()
    for peer in wanted:
        try:
            if peer == "dictionary_learning":
                impls.append(DictionaryLearning(d, m, k, args.lr, steps, args.seed, dead_tokens, str(dev)))
            elif peer == "sae_lens":
                impls.append(SAELens(d, m, k, args.lr, batch, dead_tokens, prefix_ends, str(dev)))
            else:
                missing[peer] = "unknown peer name"
        except Exception as exc:  # report and continue with the others
            missing[peer] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            traceback.print_exc(limit=1)
    for peer, why in missing.items():
        print(f"peer {peer} skipped: {why} (install it with: {VENV_HINT})")

    # the matmul reference is timed inside the same interleaved loop, so a busy
    # machine slows it exactly like the implementations
    mm_x, mm_w, mm_b = (t.to(dev) for t in (torch.randn(batch, d), torch.randn(d, m) / math.sqrt(d), torch.zeros(m)))
    mm_times: list[float] = []
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    t_start = time.perf_counter()
    for i in range(steps):
        x = first if i == 0 else data.batch(i, batch).to(dev)
        for impl in impls:
            sync()
            t0 = time.perf_counter()
            with amp():
                impl.step(x, i)
            sync()
            times[impl.name].append(time.perf_counter() - t0)
        sync()
        t0 = time.perf_counter()
        with amp():
            torch.addmm(mm_b, mm_x, mm_w)
        sync()
        mm_times.append(time.perf_counter() - t0)
        if (i + 1) % max(1, steps // 5) == 0:
            line = " ".join(f"{n}={1000 * statistics.median(t[args.warmup :] or t):.0f}ms" for n, t in times.items())
            print(f"  step {i + 1}/{steps}: median step {line}  ({time.perf_counter() - t_start:.0f}s)", flush=True)

    mm_timed = mm_times[args.warmup :] or mm_times
    gf_matmul = 2.0 * batch * d * m * len(mm_timed) / sum(mm_timed) / 1e9
    mm_kind = "bf16-autocast" if autocast_on else "fp32"
    print(
        f"plain {mm_kind} matmul ({batch}x{d}) @ ({d}x{m}), timed once per step in the same loop: {gf_matmul:.1f} GFLOP/s"
    )
    results: dict[str, dict[str, float]] = {}
    for impl in impls:
        timed = times[impl.name][args.warmup :]
        tok_s = batch * len(timed) / sum(timed)
        x_hat = impl.reconstruct(held_out).float()
        achieved = impl.flops_per_token * tok_s / 1e9
        results[impl.name] = {
            "tokens_per_s": tok_s,
            "median_step_ms": 1000 * statistics.median(timed),
            "fvu": fvu(held_out, x_hat),
            "gflops": achieved,
            "gflops_frac_matmul": achieved / gf_matmul,
            "dense_equiv_gflops": 10.0 * d * m * tok_s / 1e9,
            "dead_mean": statistics.mean(impl.dead[args.warmup :] or impl.dead),
            "auxk_steps": sum(1 for n in impl.dead if n > 0),
        }

    print()
    print(f"after {steps * batch:,} tokens each:")
    print(
        f"{'impl':<22}{'tokens/s':>11}{'step ms':>10}{'FVU':>9}{'GFLOP/s':>10}{'of matmul':>11}{'dense-eq GF/s':>15}"
        f"{'dead/step':>11}{'AuxK steps':>12}"
    )
    for name, r in results.items():
        print(
            f"{name:<22}{r['tokens_per_s']:>11.0f}{r['median_step_ms']:>10.0f}{r['fvu']:>9.4f}"
            f"{r['gflops']:>10.1f}{100 * r['gflops_frac_matmul']:>10.1f}%{r['dense_equiv_gflops']:>15.1f}"
            f"{r['dead_mean']:>11.0f}{r['auxk_steps']:>8}/{steps}"
        )
    ours = results["insight"]
    ratios = {n: ours["tokens_per_s"] / r["tokens_per_s"] for n, r in results.items() if n != "insight"}
    for name, ratio in ratios.items():
        print(f"insight / {name}: {ratio:.2f}x tokens/s, FVU {ours['fvu']:.4f} vs {results[name]['fvu']:.4f}")

    dec: dict[str, float] = {}
    sel: dict[str, float] = {}
    load_end = os.getloadavg()[0]
    if dev.type == "cpu" and not args.no_extras:  # CPU kernels' comparisons (they time on the host clock)
        dec = decode_paths(batch, d, m, k, reps=3 if args.quick else 5)
        print(
            f"group decode fwd+bwd at these shapes: sparse {dec['sparse']:.1f} ms, dense {dec['dense']:.1f} ms "
            f"({dec['dense'] / dec['sparse']:.1f}x)"
        )
        load_end = os.getloadavg()[0]
        sel = selection_paths(batch, d, m, k, reps=3)
        print(
            f"BatchTopK selection of {k * batch} of {batch * m}: flat torch.topk {sel['flat_topk']:.1f} ms, "
            f"chunked (ours) {sel['chunked']:.1f} ms"
        )
    print(f"load average at end: {load_end:.2f}")
    summary = {
        "bench": "sae_train",
        "mode": "quick" if args.quick else "full",
        "shape": {"d_in": d, "n_concepts": m, "k": k, "batch": batch, "steps": steps, "lr": args.lr},
        "threads": torch.get_num_threads(),
        "device": dev.type,
        "gpu": gpu,
        "autocast": args.autocast,
        "dead_tokens": dead_tokens,
        "dead_per_step": {n: round(r["dead_mean"], 1) for n, r in results.items()},
        "auxk_steps": {n: r["auxk_steps"] for n, r in results.items()},
        "matmul_gflops": round(gf_matmul, 1),
        "tokens_per_s": {n: round(r["tokens_per_s"], 1) for n, r in results.items()},
        "ratio_tokens_per_s": {n: round(v, 2) for n, v in ratios.items()},
        "fvu": {n: round(r["fvu"], 4) for n, r in results.items()},
        "gflops_frac_matmul": {n: round(r["gflops_frac_matmul"], 3) for n, r in results.items()},
        "decode_ms": {p: round(v, 1) for p, v in dec.items()},
        "select_ms": {p: round(v, 1) for p, v in sel.items()},
        "skipped": missing,
        "loadavg": [round(load_start, 2), round(load_end, 2)],
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
