"""`insight train`: the hierarchical SAE on Ray Train (and, unchanged, inside Tune trials).

`train_loop` is the one training loop. Under Ray Train it runs on every worker
(DDP over gloo on CPU or nccl on GPU, a streaming shard of the cache's train
split per worker, dead-concept counts and the threshold's batch minimum
all-reduced so every replica holds the same state). Under Tune (`runner:
"tune"`) the same function runs inside a trial process on a local iterator of
the cache. Rank 0 validates on held-out images, logs to MLflow through the
client (no Train v2 MLflow callback exists) and writes checkpoints.

Checkpoints hold safetensors weights, optimizer state, the step and the config;
they are reported to Ray, which keeps the latest ones under
``<workdir>/ray/<run name>``. A restarted worker group (``train.max_failures``)
or ``--resume`` continues from the newest one, so the step count carries on.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VAL_TOKENS = 32768


# ---------------------------------------------------------------- worker side


class _Session:
    """What the loop needs from Ray: rank, report, the restored checkpoint."""

    def __init__(self, runner: str) -> None:
        self.runner = runner
        if runner == "train":
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self._mod = ray.train
        elif runner == "tune":
            import ray.tune

            self.rank, self.world = 0, 1
            self._mod = ray.tune
        else:
            self.rank, self.world, self._mod = 0, 1, None

    def checkpoint(self):
        return self._mod.get_checkpoint() if self._mod is not None else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if self._mod is None:
            return
        ckpt = self._mod.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._mod.report(metrics, checkpoint=ckpt)


def _all_reduce(tensor, op: str):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def _reduce_fired(fired_m, n_tokens: int):
    import torch

    packed = torch.cat([fired_m.float(), torch.tensor([float(n_tokens)], device=fired_m.device)])
    _all_reduce(packed, "SUM")
    return packed[:-1].round().to(fired_m.dtype), int(packed[-1].item())


def reduce_min_kept(min_kept):
    """The threshold sample of a step over all workers: the mean of the workers' positive BatchTopK minima.

    Each worker's minimum is a sample of the same activation quantile (`insight.sae.step`); their
    minimum, used before, is biased low. A worker that kept nothing positive (0) does not count.
    """
    import torch

    m = torch.as_tensor(min_kept, dtype=torch.float64).reshape(())
    kept = (m > 0).double()
    packed = torch.stack([m * kept, kept])  # on the tensor's device: nccl reduces GPU tensors only
    _all_reduce(packed, "SUM")
    return (packed[0] / packed[1].clamp_min(1.0)).float()


def evaluate(sae, x_nd, batch: int = 8192) -> dict[str, float]:
    """Inference-mode (thresholded) FVU, cosine and L0 on held-out tokens."""
    import torch

    from insight.sae.metrics import cosine, fvu, l0

    if x_nd is None or len(x_nd) == 0:
        return {}
    with torch.no_grad():
        zs, xh = [], []
        for i in range(0, len(x_nd), batch):
            z = sae.encode(x_nd[i : i + batch])
            zs.append(z)
            xh.append(sae.decode(z))
        z_nm, xh_nd = torch.cat(zs), torch.cat(xh)
        val_l0 = l0(z_nm)
        # val_l0_per_k: how far thresholded inference strays from the k concepts per token BatchTopK trained with
        return {"val_fvu": fvu(x_nd, xh_nd), "val_cosine": cosine(x_nd, xh_nd), "val_l0": val_l0,
                "val_l0_per_k": val_l0 / sae.k}


def _batches_local(reader, per_worker: int, val_fraction: float, seed: int, shuffle_buffer: int):
    import torch

    epoch = 0
    while True:
        for x in reader.iter_tokens(per_worker, "train", val_fraction, shuffle=True, seed=seed + epoch,
                                    shuffle_buffer=shuffle_buffer):
            if len(x) == per_worker:
                yield torch.from_numpy(x)
        epoch += 1


def _batches_ray(per_worker: int, shuffle_buffer: int, device):
    import ray.train
    import torch

    shard = ray.train.get_dataset_shard("train")
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, dtypes=torch.float32,
                                              device=device, local_shuffle_buffer_size=shuffle_buffer or None):
            n += 1
            yield batch["x"]
        if n == 0:
            raise RuntimeError("the train split holds fewer tokens than one batch per worker")


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker SAE loop; ``config`` is plain JSON (see `train`)."""
    import torch

    from insight.cache import CacheReader
    from insight.config import InsightConfig
    from insight.sae.model import MatryoshkaSAE
    from insight.sae.step import (
        calibrate_threshold,
        calibrate_threshold_heldout,
        load_checkpoint,
        make_optimizer,
        save_sae,
        train_step,
    )

    cfg = InsightConfig.model_validate(config["cfg"])
    session = _Session(config.get("runner", "train"))
    rank, world = session.rank, session.world
    if config.get("runner") == "train":
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    reader = CacheReader(config["cache"])
    d_in = reader.manifest.dim
    global_batch = cfg.train.batch_size
    per_worker = global_batch // world
    total_steps = int(config["total_steps"])

    sae = MatryoshkaSAE.from_config(d_in, cfg.sae, seed=cfg.train.seed, device=device)
    opt = make_optimizer(sae, cfg.train.lr)
    step, resumed_from = 0, None
    ckpt = session.checkpoint()
    restore_dir = None
    if ckpt is not None:
        restore_dir = ckpt.as_directory()
    elif config.get("resume_from"):
        from contextlib import nullcontext

        restore_dir = nullcontext(config["resume_from"])
    if restore_dir is not None:
        with restore_dir as d:
            c = load_checkpoint(Path(d) / "sae" if (Path(d) / "sae").is_dir() else d, device=device)
            sae.load_state_dict(c.model.state_dict())
            if c.optimizer_state is not None:
                opt.load_state_dict(c.optimizer_state)
            step = resumed_from = int(c.step or 0)

    if config.get("runner") == "train":
        batches = _batches_ray(per_worker, cfg.train.shuffle_buffer, device)
    else:
        batches = _batches_local(reader, per_worker, cfg.cache.val_fraction, cfg.train.seed + step,
                                 cfg.train.shuffle_buffer)

    if resumed_from is None:
        first = next(batches).to(device)
        sae.init_from_batch(first)
    model = sae
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(sae, move_to_device=False)  # DDP; syncs rank 0's init

    val_x = None
    heldout_theta = cfg.sae.threshold_calibration_batches > 0 and cfg.sae.threshold_calibration_split == "heldout"
    if rank == 0 or heldout_theta:  # every worker calibrates theta on the same held-out tokens
        first_val = next(reader.iter_tokens(VAL_TOKENS, "val", cfg.cache.val_fraction), None)  # stops reading there
        if first_val is not None:
            val_x = torch.from_numpy(first_val).to(device)
    client = None
    if rank == 0 and config.get("run_id"):
        from mlflow import MlflowClient

        client = MlflowClient(config["tracking_uri"])
        if resumed_from is not None:
            client.set_tag(config["run_id"], "insight.resumed_from_step", str(resumed_from))

    reduce = world > 1
    t_last, tokens_last = time.perf_counter(), 0
    logs: dict[str, float] = {}
    while step < total_steps:
        x = next(batches).to(device, non_blocking=True)
        logs = train_step(model, opt, x, cfg.sae, step, grad_clip=cfg.train.grad_clip,
                          reduce_fired=_reduce_fired if reduce else None,
                          reduce_min=reduce_min_kept if reduce else None)
        step += 1
        tokens_last += len(x) * world
        last = step == total_steps
        if last and cfg.sae.threshold_calibration_batches:
            if heldout_theta and val_x is not None:  # the same theta on every worker: no reduction needed
                theta = calibrate_threshold_heldout(model, val_x)
            else:
                theta = calibrate_threshold(model, batches, cfg.sae.threshold_calibration_batches,
                                            reduce_min=reduce_min_kept if reduce else None)
            if theta is not None:
                logs["threshold"] = theta
        if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or last:
            now = time.perf_counter()
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            metrics.update(step=step, tokens=step * global_batch,
                           tokens_per_s=tokens_last / max(now - t_last, 1e-9),
                           resumed_from=-1 if resumed_from is None else resumed_from)
            t_last, tokens_last = now, 0
            if rank == 0:
                metrics.update(evaluate(sae, val_x))
                sys.stderr.write(
                    f"[train] step {step}/{total_steps} | {metrics['tokens_per_s']:,.0f} tok/s | "
                    f"loss {metrics.get('loss', float('nan')):.4f} | fvu {metrics.get('fvu', float('nan')):.4f}"
                    f" | l0 {metrics.get('l0', float('nan')):.1f} | val_fvu {metrics.get('val_fvu', float('nan')):.4f}\n")
                sys.stderr.flush()
                if client is not None:
                    from mlflow.entities import Metric

                    ts = int(time.time() * 1000)
                    client.log_batch(config["run_id"], metrics=[Metric(k, v, ts, step) for k, v in metrics.items()
                                                                if math.isfinite(v)])
            ckpt_dir = None
            tmp = None
            if rank == 0 and (step % cfg.train.checkpoint_every == 0 or last):
                tmp = tempfile.mkdtemp(prefix="insight-ckpt-")
                save_sae(Path(tmp) / "sae", sae, cfg.to_dict(), opt.state_dict(), step)
                ckpt_dir = tmp  # the reported checkpoint holds the folder sae/
                if last and config.get("final_dir"):
                    save_sae(config["final_dir"], sae, cfg.to_dict(), opt.state_dict(), step)  # the run's artifact
                    if client is not None and config.get("runner") == "tune":
                        # Before the last report: Tune may end the trial as soon as it sees it.
                        client.log_artifacts(config["run_id"], config["final_dir"], "checkpoint")
                        client.set_terminated(config["run_id"], "FINISHED")
            session.report(metrics, ckpt_dir)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- driver side


def _latest_checkpoint(folder: Path) -> Path | None:
    """Newest checkpoint (by recorded step) under a Ray run folder."""
    best, best_step = None, -1
    for cfg_file in folder.glob("**/sae/config.json") if folder.exists() else []:
        try:
            step = int(json.loads(cfg_file.read_text()).get("step") or 0)
        except (json.JSONDecodeError, OSError):
            continue
        if step > best_step:
            best, best_step = cfg_file.parent, step
    return best


@contextmanager
def _shard_errors_named():
    """A shard that goes bad during training fails a Ray Data task inside a worker; re-raise the
    CacheError that names it instead of Ray's WorkerGroupError and its remote traceback."""
    from insight.cache import cache_error_in

    try:
        yield
    except Exception as exc:
        bad = cache_error_in(exc)
        if bad is None or bad is exc:
            raise
        raise bad from None


def _train_dataset(reader, cfg):
    """The train split as a Ray Dataset: held in the object store when small, streamed when not."""
    ds = reader.to_ray_dataset("train", cfg.cache.val_fraction)
    nbytes = reader.manifest.num_tokens * reader.manifest.dim * 4
    # With a materialized dataset, a worker group restarted after a failure began at step 0 instead of
    # the last checkpoint (tests/test_train.py::test_killed_worker_is_survived): keep streaming then.
    if nbytes <= cfg.train.materialize_bytes and cfg.train.max_failures == 0:
        log.info("train: the cache's %.1f MB fit train.materialize_bytes: read once, reused every epoch", nbytes / 1e6)
        ds = ds.materialize()
    return ds


def plan_steps(cfg, reader) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    n_train = reader.manifest.num_tokens * (1 - cfg.cache.val_fraction)
    return max(1, math.floor(cfg.train.epochs * n_train / cfg.train.batch_size))


def loop_config(cfg, cache: str, total_steps: int, runner: str, run_id: str | None = None,
                resume_from: str | None = None, final_dir: str | None = None) -> dict[str, Any]:
    """The JSON handed to `train_loop` (the same for Ray Train workers and Tune trials)."""
    return {"cfg": cfg.to_dict(), "cache": cache, "total_steps": total_steps, "runner": runner,
            "run_id": run_id, "tracking_uri": cfg.tracking.resolved_uri(cfg.workdir),
            "resume_from": resume_from, "final_dir": final_dir}


def run_name(cfg) -> str:
    return cfg.train.run_name or f"{cfg.name}-train"


def train(cfg, resume: bool = False) -> dict[str, Any]:
    """Train the SAE of ``cfg`` on Ray Train; returns the step result (JSON-able)."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from insight import tracking
    from insight.cache import CacheReader
    from insight.cache.locate import resolve_cache
    from insight.runtime import ensure_ray

    if cfg.train.batch_size % cfg.train.num_workers:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over "
                         f"train.num_workers={cfg.train.num_workers}")
    cache = resolve_cache(cfg)
    reader = CacheReader(cache)
    total_steps = plan_steps(cfg, reader)
    name = run_name(cfg)
    storage = Path(cfg.workdir).resolve() / "ray"
    resume_from = None
    if resume:
        latest = _latest_checkpoint(storage / name)
        if latest is None:
            raise ValueError(f"--resume: no checkpoint of run {name!r} under {storage / name}")
        resume_from = str(latest)
    elif (storage / name).exists():
        shutil.rmtree(storage / name)  # a fresh run must not pick up an old run's checkpoints
    ensure_ray(cfg)
    import ray

    total_cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if need + 0.5 > total_cpus:
        raise ValueError(
            f"train.num_workers x train.cpus_per_worker = {need:g} CPUs leaves less than half a CPU of the "
            f"cluster's {total_cpus:g} for streaming data; lower train.cpus_per_worker or add CPUs")
    t0 = time.perf_counter()
    with tracking.step_run(cfg, "train", tags={"insight.cache_key": reader.key}) as run, _shard_errors_named():
        mlflow.set_tag("insight.cache", cache)
        mlflow.log_param("total_steps", total_steps)
        final = Path(cfg.workdir).resolve() / "runs" / name / "sae"
        lc = loop_config(cfg, cache, total_steps, "train", run.info.run_id, resume_from, str(final))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=lc,
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets={"train": _train_dataset(reader, cfg)},
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        if not (final / "config.json").is_file():
            raise RuntimeError(f"training finished but wrote no final checkpoint at {final}")
        mlflow.log_artifacts(str(final), "checkpoint")
        metrics = dict(result.metrics or {})
        wall = time.perf_counter() - t0
        mlflow.log_metric("wall_s", wall)
        return {
            "run_id": run.info.run_id, "checkpoint": str(final), "cache": cache, "cache_key": reader.key,
            "steps": int(metrics.get("step", total_steps)), "fvu": metrics.get("fvu"), "l0": metrics.get("l0"),
            "val_fvu": metrics.get("val_fvu"), "val_cosine": metrics.get("val_cosine"),
            "val_l0": metrics.get("val_l0"), "k": cfg.sae.k,
            "val_l0_per_k": metrics.get("val_l0_per_k"), "threshold": metrics.get("threshold"),
            "tokens_per_s": metrics.get("tokens_per_s"), "resumed_from": metrics.get("resumed_from"),
            "num_workers": cfg.train.num_workers, "wall_s": wall,
        }

