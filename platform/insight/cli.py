"""The `insight` command line: one subcommand per pipeline step.

Every step takes ``--config FILE`` and repeated ``--set a.b=value``, validates
the whole config before any work, logs to stderr, and prints one JSON object
with its results as the last line of stdout so steps can be scripted.
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
config_app = typer.Typer(no_args_is_help=True, help="Show and check configs.")
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (defaults: the schema).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: --set sae.k=16 (repeatable).")


def emit(result: dict[str, Any]) -> None:
    """The step's result: one JSON object, the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


class StepFailed(Exception):
    pass


def run_step(fn: Callable[[], dict[str, Any]]) -> None:
    """Run a step; known failures print a clear message and a JSON error line, exit 2."""
    from insight.cache.format import CacheError

    try:
        result = fn()
    except (ConfigError, CacheError, FileNotFoundError, ValueError, StepFailed) as exc:
        typer.echo(f"error: {exc}", err=True)
        emit({"ok": False, "error": str(exc)})
        raise typer.Exit(2) from None
    emit({"ok": True, **result})


def _setup_logging() -> None:
    level = os.environ.get("INSIGHT_LOG", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    """Read every shard and check its checksum; names the first bad shard."""

    def go() -> dict[str, Any]:
        from insight.cache import CacheReader

        reader = CacheReader(location)
        for info in reader.manifest.shards:
            reader.read_shard(info, verify=True)
        return {"cache": location, "shards": len(reader.manifest.shards), "verified": True}

    run_step(go)


@config_app.command("show")
def config_show(config: str = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the fully resolved config (defaults + file + overrides)."""
    run_step(lambda: {"config": _load(config, set_).to_dict()})


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="insight")


if __name__ == "__main__":
    main()
