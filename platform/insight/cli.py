"""The `insight` command line: one subcommand per pipeline step.

Every step takes ``--config FILE`` and repeated ``--set a.b=value``, validates
the whole config before any work, logs to stderr, and prints one JSON object
with its results as the last line of stdout so steps can be scripted.

Options mean the same everywhere: ``--model`` defaults to
``models:/<tracking.registered_model>@<tracking.alias>`` (concepts, evaluate,
serve); ``--cache`` names the cache a step reads (train, sweep, concepts;
evaluate reads images, not a cache); ``--no-track`` exists on the steps whose
output is a file (extract, train-dinoiser), while train, sweep, concepts and
evaluate keep their results in MLflow (runs, the registry) and always log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from insight.config import ConfigError, InsightConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Insight: hierarchical concept models for CLIP, on Ray.")
cache_app = typer.Typer(no_args_is_help=True, help="Activation caches: import, inspect, verify.")
config_app = typer.Typer(no_args_is_help=True, help="Show, explain and check configs.")
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (defaults: the schema).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: --set sae.k=16 (repeatable).")
CacheOpt = typer.Option(None, "--cache", help="Cache folder or URI to read (default: the cache this config extracts;"
                        " same as --set train.cache=...).")


def emit(result: dict[str, Any]) -> None:
    """The step's result: one JSON object, the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


class StepFailed(Exception):
    pass


def run_step(fn: Callable[[], dict[str, Any]]) -> None:
    """Run a step; known failures print a clear message and a JSON error line, exit 2."""
    from insight.cache.format import cache_error_in

    try:
        result = fn()
    except Exception as exc:
        # A bad cache may surface inside a Ray task or Train worker: report the shard-naming
        # CacheError itself, not Ray's wrapper and its remote traceback.
        known = cache_error_in(exc)
        if known is None and isinstance(exc, (ConfigError, FileNotFoundError, ValueError, StepFailed)):
            known = exc
        if known is None:
            raise
        typer.echo(f"error: {known}", err=True)
        emit({"ok": False, "error": str(known)})
        raise typer.Exit(2) from None
    emit({"ok": True, **result})


def _setup_logging() -> None:
    level = os.environ.get("INSIGHT_LOG", "INFO").upper()
    # Libraries (open_clip logs on the root logger) stay at WARNING; our own at `level`.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("insight").setLevel(level)


def _load(config: str | None, sets: list[str] | None) -> InsightConfig:
    return load_config(config, sets or [])


@app.callback()
def _main() -> None:
    _setup_logging()


@app.command()
def extract(config: str = ConfigOpt, set_: list[str] = SetOpt,
            track: bool = typer.Option(True, help="Log the step to MLflow.")) -> None:
    """Extract dense patch features into a content-addressed activation cache."""

    def go() -> dict[str, Any]:
        cfg = _load(config, set_)
        from insight.cache.extract import extract as do_extract

        if not track:
            return do_extract(cfg)
        from insight import tracking

        with tracking.step_run(cfg, "extract") as run:
            result = do_extract(cfg)
            import mlflow

            mlflow.set_tag("insight.cache_key", result["key"])
            mlflow.set_tag("insight.cache", result["cache"])
            tracking.log_result(result)
            return {**result, "run_id": run.info.run_id}

    run_step(go)


@app.command()
def train(config: str = ConfigOpt, set_: list[str] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Continue the run from its latest checkpoint."),
          cache: str = CacheOpt) -> None:
    """Train the hierarchical SAE on the activation cache with Ray Train (always logged to MLflow)."""

    def go() -> dict[str, Any]:
        cfg = _load(config, [*(set_ or []), *([f"train.cache={cache}"] if cache else [])])
        from insight.training.sae import train as do_train

        return do_train(cfg, resume=resume)

    run_step(go)


@app.command("train-dinoiser")
def train_dinoiser(config: str = ConfigOpt, set_: list[str] = SetOpt,
                   track: bool = typer.Option(True, help="Log the step to MLflow.")) -> None:
    """Train the DINOiser refinement heads (Ray Train); use them with backbone.dinoiser.heads=<file>."""

    def go() -> dict[str, Any]:
        cfg = _load(config, set_)
        from ray.train import TrainingFailedError

        from insight.training.dinoiser import train_dinoiser as do_train

        try:
            if not track:
                return do_train(cfg)
            import mlflow

            from insight import tracking

            with tracking.step_run(cfg, "train-dinoiser") as run:
                result = do_train(cfg, tracking={"uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id})
                mlflow.set_tag("insight.dinoiser_heads", result["heads"])
                mlflow.set_tag("insight.dinoiser_heads_sha256", result["heads_sha256"])
                tracking.log_result(result)
                mlflow.log_artifact(result["heads"], "dinoiser")
                return {**result, "run_id": run.info.run_id}
        except TrainingFailedError as exc:
            raise StepFailed(f"train-dinoiser failed: {exc}") from None

    run_step(go)


@app.command()
def sweep(config: str = ConfigOpt, set_: list[str] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="Resume an interrupted sweep of the same name."),
          cache: str = CacheOpt) -> None:
    """Sweep the SAE's settings (sweep.space) with Ray Tune; register the best trial as the champion (MLflow)."""

    def go() -> dict[str, Any]:
        cfg = _load(config, [*(set_ or []), *([f"train.cache={cache}"] if cache else [])])
        from insight.sweeps.tune import sweep as do_sweep

        return do_sweep(cfg, resume=resume)

    run_step(go)


@app.command()
def concepts(
    model: str = typer.Option(None, "--model", "-m", help="models:/name@alias (or name@alias), models:/name/version, a run id or a "
                              "checkpoint folder (default: models:/<tracking.registered_model>@<tracking.alias>)."),
    cache: str = typer.Option(None, "--cache", help="Cache folder or URI to read (default: the one the model was trained on)."),
    config: str = ConfigOpt, set_: list[str] = SetOpt,
) -> None:
    """Mine concept relations, hierarchy, names and galleries of a trained SAE (logged with its MLflow run)."""

    def go() -> dict[str, Any]:
        cfg = _load(config, set_)
        from insight.concepts.run import mine_concepts

        return mine_concepts(cfg, model, cache=cache)

    run_step(go)


@app.command()
def evaluate(
    model: str = typer.Option(None, "--model", "-m", help="models:/name@alias (or name@alias), models:/name/version, a run id or a "
                              "checkpoint folder (default: models:/<tracking.registered_model>@<tracking.alias>)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Dataset YAML (configs/datasets/*.yaml): its data "
                                "section replaces the config's, its tasks keys are merged; --set goes last."),
    task: str = typer.Option("auto", "--task", help="auto, segmentation, classification or both."),
    probe: bool = typer.Option(False, "--probe", help="Also train and score a concept-bottleneck probe (Ray Train); it is "
                               "saved with the model, where `insight serve` finds it."),
    config: str = ConfigOpt, set_: list[str] = SetOpt,
) -> None:
    """Segmentation/classification through concepts vs the opaque backbone: mIoU, accuracy, ratio, pictures."""

    def go() -> dict[str, Any]:
        from insight.tasks.evaluate import evaluate as do_evaluate
        from insight.tasks.evaluate import load_eval_config

        cfg = load_eval_config(config, dataset, set_)
        return do_evaluate(cfg, model, task=task, probe=probe)

    run_step(go)


@app.command()
def ui(config: str = ConfigOpt, set_: list[str] = SetOpt,
       port: int = typer.Option(5000, help="Port on 127.0.0.1."),
       print_only: bool = typer.Option(False, "--print", help="Only print the command.")) -> None:
    """Open the MLflow UI on the store the runs of this config used (127.0.0.1)."""
    import shlex
    import shutil

    cfg = _load(config, set_)
    uri = cfg.tracking.resolved_uri(cfg.workdir)
    mlflow_bin = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    from insight.tracking import store_exists

    if not store_exists(uri):
        typer.echo(f"warning: no MLflow store at {uri} yet: nothing was logged with this config; pass the --config"
                   " your steps ran with (each config's workdir holds its own store)", err=True)
    if print_only:
        emit({"ok": True, "command": shlex.join(cmd), "tracking_uri": uri, "store_exists": store_exists(uri)})
        return
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} for {uri}", err=True)
    os.execv(cmd[0], cmd)


def _quickstart_profile() -> str:
    """configs/quickstart.yaml of the working directory, else of the checkout this package runs from."""
    from pathlib import Path

    for path in (Path("configs") / "quickstart.yaml", Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"):
        if path.is_file():
            return str(path.resolve())
    raise StepFailed("no --config given, and no configs/quickstart.yaml in the working directory or in the checkout"
                     " insight is installed from: pass --config PATH (the repository's configs/quickstart.yaml)")


@app.command()
def quickstart(config: str = typer.Option(None, "--config", "-c", help="YAML config file (default: configs/quickstart.yaml"
                                          " of the working directory, else of the checkout insight runs from)."),
               set_: list[str] = SetOpt,
               serve_check: bool = typer.Option(True, "--serve/--no-serve", help="Serve and query the champion.")) -> None:
    """Every step end to end (extract, sweep, concepts, evaluate, serve) and an HTML report: `make demo`."""

    def go() -> dict[str, Any]:
        nonlocal config
        config = config or _quickstart_profile()
        cfg = _load(config, set_)
        from insight.quickstart import run_quickstart

        return run_quickstart(cfg, config, list(set_ or []), serve_check=serve_check)

    run_step(go)


@cache_app.command("import")
def cache_import(
    features: str = typer.Option(..., help="NumPy .npy of patch grids (N, H, W, D)."),
    out: str = typer.Option(None, help="Cache root (default: cache.root of the config)."),
    ids: str = typer.Option(None, help="Image ids: text file (one per line) or .npy of strings."),
    text: str = typer.Option(None, help="Optional vocabulary text embeddings .npy (V, D)."),
    words: str = typer.Option(None, help="Words for --text, one per line."),
    config: str = ConfigOpt, set_: list[str] = SetOpt,
) -> None:
    """Turn features computed elsewhere into a cache that every later step reads."""

    def go() -> dict[str, Any]:
        cfg = _load(config, set_)
        from insight.cache.importer import import_features

        return import_features(features, out or cfg.path(cfg.cache.root), ids=ids, dtype=cfg.cache.dtype,
                               shard_images=cfg.cache.shard_images, text=text, words=words)

    run_step(go)


@cache_app.command("info")
def cache_info(location: str = typer.Argument(..., help="Cache folder or URI (…/<key>).")) -> None:
    """Print a cache's manifest summary."""

    def go() -> dict[str, Any]:
        from insight.cache import CacheReader

        m = CacheReader(location).manifest
        return {"cache": location, "key": m.key, "grid": list(m.grid), "dim": m.dim, "dtype": m.dtype,
                "shards": len(m.shards), "images": m.num_images, "tokens": m.num_tokens,
                "skipped": len(m.skipped), "text": bool(m.text)}

    run_step(go)


@cache_app.command("verify")
def cache_verify(location: str = typer.Argument(..., help="Cache folder or URI (…/<key>).")) -> None:
    """Read every shard, check its size and sha256 against the manifest and decode it; names every bad shard."""

    def go() -> dict[str, Any]:
        from insight.cache import CacheReader, ShardError
        from insight.cache.format import REBUILD_HINT

        reader = CacheReader(location)
        bad = []
        for info in reader.manifest.shards:
            try:
                reader.read_shard(info, verify=True)
            except ShardError as exc:
                bad.append(f"{exc.shard} {exc.problem}")
        if bad:
            raise StepFailed(f"{len(bad)} of {len(reader.manifest.shards)} shards of {location} are bad: "
                             f"{'; '.join(bad[:20])}{' …' if len(bad) > 20 else ''}; {REBUILD_HINT}")
        return {"cache": location, "shards": len(reader.manifest.shards), "verified": True}

    run_step(go)


@config_app.command("show")
def config_show(config: str = ConfigOpt, set_: list[str] = SetOpt,
                as_json: bool = typer.Option(False, "--json", help="One JSON line ({ok, config}) instead of YAML."),
                explain: bool = typer.Option(False, "--explain", help="Each key's description as a comment above it.")
                ) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML; secrets are masked."""
    from insight.config import masked, to_yaml

    if as_json:
        run_step(lambda: {"config": masked(_load(config, set_).to_dict())})
        return
    try:
        text = to_yaml(_load(config, set_), explain=explain)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text, nl=False)


@config_app.command("explain")
def config_explain(key: str = typer.Argument("", help="Dotted key (train.lr) or section (sae); none: the sections."),
                   as_json: bool = typer.Option(False, "--json", help="One JSON line instead of text.")) -> None:
    """What a config key means: description, type, default, allowed values and range."""
    from insight.config import explain_key

    try:
        info = explain_key(key)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        if as_json:
            emit({"ok": False, "error": str(exc)})
        raise typer.Exit(2) from None
    if as_json:
        emit({"ok": True, **info})
        return
    if "keys" in info:  # a section: its description, then one line per key
        typer.echo(f"{info['key'] or 'config'}: {info['description']}")
        width = max(len(k) for k in info["keys"])
        for k, text in info["keys"].items():
            typer.echo(f"  {k.ljust(width)}  {text}")
        return
    typer.echo(f"{info['key']}: {info['description']}")
    typer.echo(f"  type:    {info['type']}")
    typer.echo(f"  default: {json.dumps(info['default'], default=str)}")
    if "allowed" in info:
        typer.echo(f"  allowed: {', '.join(map(str, info['allowed']))}")
    if "rules" in info:
        typer.echo(f"  rule:    {' and '.join(info['rules'])}")
    if info.get("secret"):
        typer.echo("  secret:  masked by `insight config show`; better set through the environment")
    typer.echo(f"  set it:  --set {info['key']}=VALUE, or in the config file")


@config_app.command("check")
def config_check(config: str = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Validate a config as every step would, including each choice of its sweep space; runs nothing."""

    def go() -> dict[str, Any]:
        from insight.config import masked
        from insight.sweeps.tune import validate_space

        cfg = _load(config, set_)
        validate_space(cfg)
        return {"config": config or "defaults", "name": cfg.name, "workdir": cfg.workdir,
                "tracking_uri": masked(cfg.tracking.resolved_uri(cfg.workdir)),
                "sweep_choices": sum(len(v) for v in cfg.sweep.space.values())}

    run_step(go)


# ------------------------------------------------------------------ serving (serve/ at the repository root)


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(None, "--model", "-m", help="models:/name@alias (or name@alias), models:/name/version, a run id or a "
                              "checkpoint folder (default: models:/<tracking.registered_model>@<tracking.alias>)."),
    config: str = ConfigOpt, set_: list[str] = SetOpt,
    blocking: bool = typer.Option(True, "--blocking/--no-blocking",
                                  help="Keep serving until Ctrl-C / SIGTERM, or deploy and return (on a running cluster)."),
) -> None:
    """Serve the model over HTTP (JSON API, OpenAPI docs, browser page) with Ray Serve on serve.host:serve.port."""
    state: dict[str, Any] = {}

    def go() -> dict[str, Any]:
        from insight.runtime import serve_app_module

        appmod = serve_app_module()
        # One resolution (config file, --set, the API key from the environment) for everything below.
        cfg, ref, uri = appmod.resolve({"model": model, "config": config, "set": set_ or []})
        appmod.check_model(ref, uri)
        application = appmod.application(cfg, ref, uri)
        from ray import serve as ray_serve

        from insight.runtime import ensure_ray

        ensure_ray(cfg)
        ray_serve.start(http_options=appmod.http_options(cfg))
        try:
            ray_serve.run(application, name="insight", route_prefix="/")
        except Exception as exc:  # a replica failed to start (bad model, port, resources): say so, exit 2
            raise StepFailed(f"deploying {ref} failed: {exc}") from None
        state["served"] = True
        if not blocking and not cfg.cluster.address and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            typer.echo("warning: --no-blocking with a Ray this command started itself: Serve stops when it exits;"
                       " set cluster.address to deploy onto a running cluster", err=True)
        host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
        url = f"http://{host}:{cfg.serve.port}"
        return {"url": url, "model": ref, "tracking_uri": uri, "docs": f"{url}/docs", "blocking": blocking,
                "api_key": bool(cfg.serve.api_key)}

    run_step(go)
    if blocking and state.get("served"):
        import signal
        import threading

        from ray import serve as ray_serve

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        typer.echo("serving; Ctrl-C or SIGTERM stops", err=True)
        stop.wait()
        typer.echo("shutting Serve down", err=True)
        ray_serve.shutdown()


# ------------------------------------------------------------------ remote clusters (insight.cluster)

jobs_app = typer.Typer(no_args_is_help=True, help="Manage steps submitted to a Ray cluster: status, logs, stop.")
app.add_typer(jobs_app, name="jobs")
AddressOpt = typer.Option(None, "--address", help="Ray dashboard URL, http://HOST:8265 (default: cluster.address of"
                          " --config, else $RAY_ADDRESS).")


def _jobs_address(address: str | None, config: str | None, sets: list[str] | None) -> str:
    """The dashboard address the jobs commands talk to: --address, cluster.address of --config/--set, $RAY_ADDRESS."""
    from insight import cluster

    return cluster.resolve_address(address, cluster.cluster_settings(config, sets).get("address"))


def _cluster_step(fn: Callable[[], dict[str, Any]]) -> None:
    """run_step for cluster commands; a followed job that did not succeed prints ok=false and exits 1."""
    from insight.cluster import ClusterError, JobFailed

    def go() -> dict[str, Any]:
        try:
            return fn()
        except JobFailed:
            raise
        except ClusterError as exc:
            raise StepFailed(str(exc)) from None

    try:
        run_step(go)
    except JobFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        emit({"ok": False, **exc.result, "error": str(exc)})
        raise typer.Exit(1) from None


@app.command()
def submit(
    step: str = typer.Argument(..., help="Pipeline step: a jobs/<step>.py entrypoint (train-dinoiser -> train_dinoiser.py)."),
    step_args: list[str] = typer.Argument(None, help="After --: more arguments for the step, e.g. -- --resume."),
    config: str = ConfigOpt, set_: list[str] = SetOpt,
    address: str = typer.Option(None, "--address", help="Ray dashboard URL, http://HOST:8265 (default: cluster.address, $RAY_ADDRESS)."),
    image: str = typer.Option(None, "--image", help="The image the cluster's pods already run (built from the Dockerfile):"
                              " upload nothing, run the step from cluster.project_dir inside it; the name is only recorded"
                              " in the job's metadata, the manifests choose the image (default: cluster.image)."),
    env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE for the job's environment (repeatable)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the job ends; exit 1 unless it SUCCEEDED."),
    submission_id: str = typer.Option(None, "--job-id", help="Submission id (default: insight-<step>-<random>)."),
) -> None:
    """Run a pipeline step on a remote Ray cluster as a Ray job (docs/cluster.md)."""
    from insight import cluster

    _cluster_step(lambda: cluster.submit(step, config, set_, address=address, image=image, env=env,
                                         follow=follow, submission_id=submission_id, step_args=step_args))


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="Submission id."), address: str = AddressOpt,
                config: str = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Status, message and metadata of a submitted job."""
    from insight import cluster

    _cluster_step(lambda: cluster.job_status(job_id, _jobs_address(address, config, set_)))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Submission id."), address: str = AddressOpt,
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit 1 unless it SUCCEEDED."),
              config: str = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print a job's logs (its driver's stdout and stderr), then its status as JSON."""
    from insight import cluster

    _cluster_step(lambda: cluster.job_logs(job_id, _jobs_address(address, config, set_), follow=follow))


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Submission id."), address: str = AddressOpt,
              config: str = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Stop a running job and wait until the cluster reports it ended."""
    from insight import cluster

    _cluster_step(lambda: cluster.job_stop(job_id, _jobs_address(address, config, set_)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="insight")


if __name__ == "__main__":
    main()
