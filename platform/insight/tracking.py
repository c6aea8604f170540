"""MLflow tracking: one place that knows the URI, the experiment and run layout."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------- loading models


@dataclass
class LoadedModel:
    """A trained SAE with everything later steps need to use it."""

    sae: Any  # insight.sae.MatryoshkaSAE
    config: Any  # InsightConfig the model was trained with
    checkpoint: Path  # local folder with model.safetensors + config.json
    run_id: str | None = None
    version: str | None = None
    name: str | None = None
    artifacts: Path | None = None  # local copy of the run's artifacts (concepts, plots) when fetched
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        if self.name and self.version:
            return f"models:/{self.name}/{self.version}"
        if self.run_id:
            return f"runs:/{self.run_id}/checkpoint"
        return str(self.checkpoint)

    @property
    def concepts(self) -> Any:
        """The concept table `insight concepts` mined for this model (`insight.concepts.ConceptTable`).

        Read from the run's artifact folder ``concepts/`` (fetched with the model) or, for a model
        loaded from a checkpoint folder, from that folder's sibling ``concepts/``.
        """
        from insight.concepts.table import ConceptTable

        places = list(dict.fromkeys(([self.artifacts / "concepts"] if self.artifacts else [])
                                    + [self.checkpoint.parent / "concepts"]))
        for folder in places:
            if (folder / "concepts.parquet").is_file() or (folder / "concepts.json").is_file():
                return ConceptTable.load(folder)
        raise FileNotFoundError(f"model {self.uri} has no concept table (looked in "
                                f"{', '.join(str(p) for p in places)}); run `insight concepts --model ...` first")


def _from_checkpoint(folder: Path, **extra: Any) -> LoadedModel:
    from insight.config import InsightConfig
    from insight.sae import load_checkpoint

    ck = load_checkpoint(folder)
    cfg = InsightConfig.model_validate(ck.config) if ck.config else InsightConfig()
    return LoadedModel(sae=ck.model.eval(), config=cfg, checkpoint=folder, **extra)


def champion_ref(cfg: Any) -> str:
    """The model a step uses when none is named: the registry alias the sweep moves to its best trial."""
    return f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"


def load_model(ref: str, tracking_uri: str | None = None, dst: str | None = None) -> LoadedModel:
    """Load an SAE by ``models:/name@alias`` / ``models:/name/version``, an MLflow run id, or a
    checkpoint folder. Registered models and runs are fetched from the tracking store
    (``tracking_uri``, else MLflow's current one) into ``dst`` (default: a temp folder).
    """
    import tempfile

    folder = Path(ref)
    if folder.is_dir():
        if not (folder / "config.json").is_file() and (folder / "sae" / "config.json").is_file():
            folder = folder / "sae"
        return _from_checkpoint(folder)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else mlflow.MlflowClient()
    name = version = None
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = body.rsplit("/", 1)
                mv = client.get_model_version(name, version)
        except (mlflow.exceptions.MlflowException, ValueError) as exc:
            raise ValueError(f"model {ref!r} not found in {client.tracking_uri}: {exc}") from None
        run_id, version = mv.run_id, mv.version
    elif len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        run_id = ref
    else:
        raise ValueError(f"--model {ref!r}: expected models:/name@alias, models:/name/version, "
                         "an MLflow run id, or a checkpoint folder")
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"run {run_id} not found in {client.tracking_uri}: {exc}") from None
    out = Path(dst or tempfile.mkdtemp(prefix="insight-model-"))
    out.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="", dst_path=str(out),
                                                     tracking_uri=client.tracking_uri))
    ckpt = local / "checkpoint"
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"run {run_id} has no SAE checkpoint artifact (checkpoint/config.json)")
    return _from_checkpoint(ckpt, run_id=run_id, version=version, name=name, artifacts=local,
                            metrics=dict(run.data.metrics))
