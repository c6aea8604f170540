"""`insight sweep`: Ray Tune over the SAE, tracked in MLflow, best model registered.

Each trial is the `insight train` loop itself (`training.sae.train_loop`, runner
"tune") on the config with the trial's overrides applied, so a sweep can never
drift from a single training run. The driver owns one MLflow parent run; each
trial opens a nested child run (params, metric curves, final checkpoint, cache
key). ASHA stops trials whose validation FVU lags at a rung. After the sweep the
driver draws the Pareto front of validation FVU against L0, picks the best
trial by the configured objective and registers it as a model version with an
alias, so later steps load ``models:/<name>@<alias>`` and nothing else.

An interrupted sweep resumes from its Tune folder (finished trials are not
rerun) and keeps its MLflow parent run (its id is stored beside the Tune state).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARENT_FILE = "insight_parent_run.json"


def sweep_name(cfg) -> str:
    return cfg.sweep.name or f"{cfg.name}-sweep"


def _search_space(cfg) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, choices in cfg.sweep.space.items():
        space[key] = tune.grid_search(list(choices)) if cfg.sweep.search == "grid" else tune.choice(list(choices))
    return space


MAX_CHECKED_COMBINATIONS = 512  # a space up to this size has every combination validated (milliseconds each)


def validate_space(cfg) -> None:
    """Every choice of every key, and every combination of choices (a grid runs them all, random search
    may draw any) when there are at most `MAX_CHECKED_COMBINATIONS`, must give a valid config: fail
    before any trial starts, naming the choice and what to change."""
    import itertools

    from insight.config import ConfigError, config_with

    def check(overrides: dict[str, Any], what: str, fix: str) -> None:
        try:
            config_with(cfg, overrides)
        except ConfigError as exc:
            problems = str(exc).split(":\n", 1)[-1]  # the problems, without the "invalid config (...)" line
            raise ConfigError(f"{what} makes an invalid config:\n{problems}\nEvery choice of sweep.space must be"
                              f" valid with the rest of the config: {fix} (`insight config check` tests a config"
                              " and its sweep space)") from None

    space = cfg.sweep.space
    for key, choices in space.items():
        for choice in choices:
            check({key: choice}, f"sweep.space.{key} choice {choice!r}",
                  f"drop it from sweep.space.{key} or change the setting it conflicts with")
    if 1 < len(space) and math.prod(len(c) for c in space.values()) <= MAX_CHECKED_COMBINATIONS:
        for values in itertools.product(*space.values()):
            combo = dict(zip(space, values, strict=True))
            check(combo, f"sweep.space combination {combo}",
                  "these keys' choices conflict with each other; sweep them in separate sweeps or drop one")


def trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: a nested MLflow run around the shared training loop."""
    from mlflow import MlflowClient

    from insight.config import InsightConfig, config_with
    from insight.tracking import flatten
    from insight.training.sae import loop_config, plan_steps, train_loop

    base = InsightConfig.model_validate(config["base"])
    overrides = {k: v for k, v in config.items() if k not in ("base", "cache", "parent_run_id", "experiment_id")}
    cfg = config_with(base, overrides)
    from insight.cache import CacheReader

    total_steps = plan_steps(cfg, CacheReader(config["cache"]))
    import ray.tune

    ctx = ray.tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    uri = cfg.tracking.resolved_uri(cfg.workdir)
    client = MlflowClient(uri)
    # Reuse the child run of this trial if the trial is being resumed.
    found = client.search_runs([config["experiment_id"]],
                               filter_string=f"tags.`insight.trial_id` = '{trial_id}' and "
                                             f"tags.`mlflow.parentRunId` = '{config['parent_run_id']}'")
    if found and found[0].info.status == "FINISHED":
        # Finished before an interruption that Tune's state did not record yet:
        # hand Tune the final metrics instead of training again.
        m = dict(found[0].data.metrics)
        ray.tune.report({**m, "step": int(m.get("step", total_steps))})
        return
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(config["experiment_id"], run_name=trial_name, tags={
            "mlflow.parentRunId": config["parent_run_id"], "insight.step": "sweep-trial",
            "insight.trial_id": trial_id, "insight.cache_key": CacheReader(config["cache"]).key})
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        client.log_dict(run_id, cfg.to_dict(), "config.json")
    final = Path(ray.tune.get_context().get_trial_dir()) / "final_sae"
    try:
        # The loop logs the final checkpoint and ends the run before its last report.
        train_loop(loop_config(cfg, config["cache"], total_steps, "tune", run_id, final_dir=str(final)))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    except BaseException:  # Tune ending the trial (ASHA stop, shutdown)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        raise
    if client.get_run(run_id).info.status == "RUNNING":  # stopped before its last step by a scheduler
        client.set_terminated(run_id, "KILLED")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (L0, FVU), both minimised, sorted by L0."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def select_best(rows: list[dict[str, Any]], cfg) -> dict[str, Any] | None:
    """Best finished trial by the configured objective (falls back to all trials).

    Every objective is measured on the validation images, which no trial trained on: a trial that
    memorises its training tokens (low training FVU, high validation FVU) loses to one that
    reconstructs unseen images better. ``overfit`` (validation minus training FVU) is reported
    beside each trial so the gap is visible, not used to pick.
    """
    finished = [r for r in rows if r["completed"]] or rows
    pool = [r for r in finished if r.get("val_fvu") is not None and math.isfinite(r["val_fvu"])]
    if cfg.sweep.selection == "min_fvu":
        if cfg.sweep.max_l0 is not None:
            capped = [r for r in pool if r["val_l0"] <= cfg.sweep.max_l0]
            if not capped:
                log.warning("sweep: no trial has val L0 <= %s; selecting among all", cfg.sweep.max_l0)
            pool = capped or pool
        return min(pool, key=lambda r: r["val_fvu"], default=None)
    return min(pool, key=lambda r: r["val_fvu"] + cfg.sweep.l0_weight * r["val_l0"], default=None)


def plot_pareto(rows: list[dict[str, Any]], front: list[int], best: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ok = [r for r in rows if r.get("val_fvu") is not None]
    ax.scatter([r["val_l0"] for r in ok], [r["val_fvu"] for r in ok], c=["tab:blue" if r["completed"] else "tab:gray"
                                                                       for r in ok], label="trials", zorder=2)
    fr = [rows[i] for i in front]
    ax.plot([r["val_l0"] for r in fr], [r["val_fvu"] for r in fr], "-o", color="tab:orange", label="Pareto front",
            zorder=3)
    for r in ok:
        ax.annotate(r["label"], (r["val_l0"], r["val_fvu"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if best is not None:
        ax.scatter([best["val_l0"]], [best["val_fvu"]], s=180, facecolors="none", edgecolors="red", linewidths=2,
                   label="selected", zorder=4)
    ax.set_xlabel("validation L0 (active concepts per patch)")
    ax.set_ylabel("validation FVU")
    ax.set_title("Sweep: reconstruction vs sparsity (grey: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rows(results, space_keys: list[str], total_steps_of) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        m = res.metrics or {}
        cfgd = res.config or {}
        overrides = {k: cfgd.get(k) for k in space_keys}
        steps = int(m.get("step", 0) or 0)
        rows.append({
            "trial_id": m.get("trial_id") or Path(res.path).name, "path": res.path,
            "label": ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()),
            "overrides": overrides, "steps": steps, "total_steps": total_steps_of(overrides),
            "completed": steps >= total_steps_of(overrides) and res.error is None,
            "val_fvu": m.get("val_fvu"), "val_cosine": m.get("val_cosine"), "val_l0": m.get("val_l0"),
            "val_l0_per_k": m.get("val_l0_per_k"), "fvu": m.get("fvu"), "l0": m.get("l0"),
            "overfit": (m["val_fvu"] - m["fvu"]) if m.get("val_fvu") is not None and m.get("fvu") is not None else None,
            "error": str(res.error)[:300] if res.error else None,
        })
    return rows


def sweep(cfg, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg``; returns the step result (JSON-able)."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from insight import tracking
    from insight.cache import CacheReader
    from insight.cache.locate import resolve_cache
    from insight.config import config_with
    from insight.runtime import ensure_ray
    from insight.training.sae import plan_steps

    validate_space(cfg)
    cache = resolve_cache(cfg)
    reader = CacheReader(cache)
    name = sweep_name(cfg)
    storage = Path(cfg.workdir).resolve() / "ray"
    exp_dir = storage / name
    uri = tracking.setup(cfg)
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    parent_file = exp_dir / PARENT_FILE
    restoring = resume and tune.Tuner.can_restore(str(exp_dir))
    if resume and not restoring:
        raise ValueError(f"--resume: no sweep {name!r} to resume under {exp_dir}")
    if not resume and exp_dir.exists():
        import shutil

        shutil.rmtree(exp_dir)  # a new sweep of the same name starts over
    ensure_ray(cfg)
    client = mlflow.MlflowClient(uri)
    if restoring and parent_file.is_file():
        parent_id = json.loads(parent_file.read_text())["run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(experiment_id, run_name=name, tags={
            "insight.step": "sweep", "insight.cache_key": reader.key, "insight.cache": cache})
        parent_id = parent.info.run_id
        exp_dir.mkdir(parents=True, exist_ok=True)
        parent_file.write_text(json.dumps({"run_id": parent_id}))
        client.log_dict(parent_id, cfg.to_dict(), "config.json")
        client.log_dict(parent_id, {"search": cfg.sweep.search, "space": cfg.sweep.space,
                                    "num_samples": cfg.sweep.num_samples}, "search_space.json")
        for k, v in tracking.flatten({"sweep": cfg.sweep.model_dump(mode="json")}).items():
            client.log_param(parent_id, k, str(v)[:500])

    def total_steps_of(overrides: dict[str, Any]) -> int:
        return plan_steps(config_with(cfg, {k: v for k, v in overrides.items() if v is not None}), reader)

    max_t = max(total_steps_of(dict(zip(cfg.sweep.space, combo, strict=True)))
                for combo in _combos(cfg.sweep.space))
    trainable = tune.with_resources(trial_fn, {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})
    t0 = time.perf_counter()
    if restoring:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if cfg.sweep.asha:
            scheduler = ASHAScheduler(time_attr="step", metric="val_fvu", mode="min", max_t=max_t,
                                      grace_period=min(cfg.sweep.asha_grace_steps, max_t),
                                      reduction_factor=cfg.sweep.asha_reduction)
        search_alg = None
        if cfg.sweep.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric="val_fvu", mode="min", seed=cfg.train.seed)
        param_space = {"base": cfg.to_dict(), "cache": cache, "parent_run_id": parent_id,
                       "experiment_id": experiment_id, **_search_space(cfg)}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=cfg.sweep.num_samples, scheduler=scheduler,
                                        search_alg=search_alg, max_concurrent_trials=cfg.sweep.max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures)),
        )
    results = tuner.fit()
    # Every trial has ended now. A trial whose own "ended" call found no MLflow server (restarted,
    # unreachable) or whose process Tune killed left its child run RUNNING: end it here.
    for stale in client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'")):
        client.set_terminated(stale.info.run_id, "KILLED")
    keys = list(cfg.sweep.space)
    rows = _rows(results, keys, total_steps_of)
    if not rows:
        raise RuntimeError("the sweep produced no trials")
    pts = [(r["val_l0"], r["val_fvu"]) if r["val_fvu"] is not None else (math.inf, math.inf) for r in rows]
    front = [i for i in pareto_front(pts) if math.isfinite(pts[i][1])]
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    best = select_best(rows, cfg)
    out_dir = Path(cfg.workdir).resolve() / "sweeps" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = out_dir / "pareto.png"
    plot_pareto(rows, front, best, plot)
    table = out_dir / "trials.csv"
    buf = io.StringIO()
    fields = ["trial_id", "label", "steps", "total_steps", "completed", "val_fvu", "val_cosine", "val_l0",
              "val_l0_per_k", "fvu",
              "overfit", "l0", "pareto", "error"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    table.write_text(buf.getvalue())
    client.log_artifact(parent_id, str(plot))
    client.log_artifact(parent_id, str(table))
    client.log_dict(parent_id, rows, "trials.json")

    result: dict[str, Any] = {"parent_run_id": parent_id, "trials": len(rows),
                              "completed_trials": sum(r["completed"] for r in rows),
                              "stopped_early": sum(not r["completed"] and r["error"] is None for r in rows),
                              "errored": sum(r["error"] is not None for r in rows),
                              "pareto_plot": str(plot), "pareto_table": str(table),
                              "wall_s": time.perf_counter() - t0}
    if best is None:
        client.set_terminated(parent_id, "FAILED")
        raise RuntimeError(f"no trial reported a validation FVU; see {table}")
    child = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`insight.trial_id` = '{best['trial_id']}'"))
    if not child:
        raise RuntimeError(f"best trial {best['trial_id']} has no MLflow child run")
    best_run = child[0].info.run_id
    client.set_tag(parent_id, "insight.best_run_id", best_run)
    client.set_tag(parent_id, "insight.best_trial", best["label"])
    client.log_metric(parent_id, "best_val_fvu", best["val_fvu"])
    client.log_metric(parent_id, "best_val_l0", best["val_l0"])
    if best.get("val_cosine") is not None:
        client.log_metric(parent_id, "best_val_cosine", best["val_cosine"])
    result.update(best_trial=best["label"], best_trial_id=best["trial_id"], best_run_id=best_run,
                  best_val_fvu=best["val_fvu"], best_val_cosine=best.get("val_cosine"), best_val_l0=best["val_l0"],
                  best_train_fvu=best.get("fvu"), best_overrides=best["overrides"])
    if cfg.sweep.register_best:
        result.update(register(cfg, client, best_run, best, parent_id))
    client.set_terminated(parent_id, "FINISHED")
    return result


def _combos(space: dict[str, list[Any]]):
    import itertools

    return itertools.product(*space.values())


def register(cfg, client, run_id: str, best: dict[str, Any], parent_id: str) -> dict[str, Any]:
    """Register the run's checkpoint as a new model version and point the alias at it."""
    import mlflow

    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Insight hierarchical SAE concept models.")
    run = client.get_run(run_id)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/checkpoint", run_id=run_id, tags={
        "val_fvu": f"{best['val_fvu']:.6f}", "val_l0": f"{best['val_l0']:.4f}",
        "insight.cache_key": run.data.tags.get("insight.cache_key", ""), "insight.sweep_run_id": parent_id,
        "overrides": json.dumps(best["overrides"])[:4000]},
        description=f"Best trial of sweep {sweep_name(cfg)}: {best['label']}")
    for _ in range(60):  # sqlite registers synchronously; servers may take a moment
        if client.get_model_version(name, mv.version).status == "READY":
            break
        time.sleep(0.5)
    client.set_registered_model_alias(name, alias, mv.version)
    return {"model": f"models:/{name}@{alias}", "model_name": name, "model_version": mv.version, "alias": alias}
