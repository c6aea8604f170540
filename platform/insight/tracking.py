"""MLflow run logging: the store, the experiment, one run per pipeline step and its params and metrics.

Models (references, loading, where a model's files live) are `insight.models`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def setup(cfg) -> str:
    """Point MLflow at the configured store (creating the sqlite folder) and experiment."""
    import mlflow

    uri = cfg.tracking.resolved_uri(cfg.workdir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        artifacts = Path(cfg.workdir).resolve() / "mlartifacts"
        kwargs = {"artifact_location": artifacts.as_uri()} if uri.startswith("sqlite") else {}
        try:
            mlflow.create_experiment(cfg.tracking.experiment, **kwargs)
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


@contextlib.contextmanager
def step_run(cfg, step: str, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
    """An MLflow run for one pipeline step, with the resolved config as params + artifact."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_name=f"{cfg.name}-{step}", nested=nested,
                          tags={"insight.step": step, **(tags or {})}) as run:
        params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_dict(cfg.to_dict(), "config.json")
        yield run


def log_result(result: dict[str, Any]) -> None:
    """Log the numeric entries of a step result as metrics."""
    import mlflow

    metrics = {k: float(v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    if metrics:
        mlflow.log_metrics(metrics)


def store_exists(tracking_uri: str) -> bool:
    """False only for a local sqlite store whose file is not there yet (remote stores are assumed to exist)."""
    return missing_store(tracking_uri) is None


def missing_store(tracking_uri: str) -> Path | None:
    """The sqlite file of a local store that does not exist yet (opening it would create it), else None."""
    if tracking_uri.startswith("sqlite:///") and tracking_uri != "sqlite:///:memory:":
        path = Path(tracking_uri[len("sqlite:///"):])
        return None if path.is_file() else path
    return None
