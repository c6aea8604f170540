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
    from insight.sae.step import load_checkpoint

    ck = load_checkpoint(folder)
    cfg = InsightConfig.model_validate(ck.config) if ck.config else InsightConfig()
    return LoadedModel(sae=ck.model.eval(), config=cfg, checkpoint=folder, **extra)


def champion_ref(cfg: Any) -> str:
    """The model a step uses when none is named: the registry alias the sweep moves to its best trial."""
    return f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"


_RUN_ID_CHARS = frozenset("0123456789abcdef")
_REF_FORMS = "models:/name@alias, models:/name/version, an MLflow run id, or a checkpoint folder"
_SWEEP_FIRST = ("`insight sweep --config <the same config>` registers its best trial as"
                " models:/<tracking.registered_model>@<tracking.alias>")


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and set(ref) <= _RUN_ID_CHARS


def store_exists(tracking_uri: str) -> bool:
    """False only for a local sqlite store whose file is not there yet (remote stores are assumed to exist)."""
    return _store_missing(tracking_uri) is None


def _store_missing(tracking_uri: str) -> Path | None:
    """The sqlite file of a local store that does not exist yet (opening it would create it), else None."""
    if tracking_uri.startswith("sqlite:///") and tracking_uri != "sqlite:///:memory:":
        path = Path(tracking_uri[len("sqlite:///"):])
        return None if path.is_file() else path
    return None


def _registry_listing(client: Any) -> str:
    """'insight (aliases: champion -> v2; versions 1-2), other (no alias)' or 'none', for error messages."""
    try:
        models = list(client.search_registered_models(max_results=20))
    except Exception:  # a listing is a courtesy; the error it decorates is what matters
        return "unknown"
    parts = []
    for m in models:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted((m.aliases or {}).items())) or "no alias"
        parts.append(f"{m.name} (aliases: {aliases})")
    return "; ".join(parts) or "none"


def check_model(ref: str, tracking_uri: str) -> Any:
    """Fail fast on a model reference that does not resolve, with what exists and what to run.

    Cheap lookups only (a folder's config.json, a registry alias or version, a run id), and no
    side effects: a local sqlite store that does not exist is reported, not created. Returns the
    model version or run found (None for a checkpoint folder); raises ValueError naming the
    reference, the store and the fix.
    """
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not ((folder / "config.json").is_file() or (folder / "sae" / "config.json").is_file()):
            raise ValueError(f"--model {ref}: the folder holds no SAE checkpoint (config.json); give the folder"
                             " `insight train` wrote (its checkpoint or its final model)")
        return None
    if not ref.startswith("models:/") and not _is_run_id(ref):
        if "/" in ref or os.sep in ref or ref.startswith((".", "~")):
            raise ValueError(f"--model {ref}: folder not found; give an existing checkpoint folder,"
                             " models:/name@alias, models:/name/version or an MLflow run id")
        raise ValueError(f"--model {ref!r}: no folder of that name, and no model reference: expected {_REF_FORMS}")
    missing = _store_missing(tracking_uri)
    if missing is not None:
        raise ValueError(f"--model {ref}: not found: there is no MLflow store at {missing} (nothing was logged with this"
                         f" config yet). {_SWEEP_FIRST}; or pass the --config (or tracking.uri) whose runs made the model:"
                         " each config's workdir holds its own store")
    return _lookup(ref, tracking_uri)


def _lookup(ref: str, tracking_uri: str) -> Any:
    """The model version (models:/...) or run (run id) ``ref`` names; ValueError says what exists."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if _is_run_id(ref):
        try:
            return client.get_run(ref)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"--model {ref}: not found: no run with this id in {tracking_uri}; `insight ui` lists"
                             " the runs of a config's store") from None
    body = ref[len("models:/"):]
    name, sep, alias = body.partition("@")
    version = None if sep else body.rpartition("/")[2]
    if not sep:
        name = body.rpartition("/")[0]
    if not name or not (alias or version):
        raise ValueError(f"--model {ref!r}: expected {_REF_FORMS}")
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--model {ref}: not found: no registered model {name!r} in {tracking_uri}; registered models:"
                         f" {_registry_listing(client)}. {_SWEEP_FIRST}") from None
    try:
        if sep:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted((registered.aliases or {}).items())) or "none"
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        what = f"alias {alias!r}" if sep else f"version {version!r}"
        raise ValueError(f"--model {ref}: not found: model {name!r} has no {what} in {tracking_uri}; its aliases: {aliases};"
                         f" its versions: {', '.join(map(str, versions)) or 'none'}. {_SWEEP_FIRST}"
                         " (tracking.alias names the alias it moves)") from None


def load_model(ref: str, tracking_uri: str | None = None, dst: str | None = None) -> LoadedModel:
    """Load an SAE by ``models:/name@alias`` / ``models:/name/version``, an MLflow run id, or a
    checkpoint folder. Registered models and runs are fetched from the tracking store
    (``tracking_uri``, else MLflow's current one) into ``dst`` (default: a temp folder).
    """
    import tempfile

    folder = Path(ref).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file() and (folder / "sae" / "config.json").is_file():
            folder = folder / "sae"
        return _from_checkpoint(folder)
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    found = check_model(ref, tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    name = version = None
    if _is_run_id(ref):
        run_id = ref
    else:
        name, run_id, version = found.name, found.run_id, found.version
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
