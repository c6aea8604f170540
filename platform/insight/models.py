"""Trained models: what a model reference may be, where a model's files live, loading one.

One parser (`parse_ref`) reads every form a step, the server and a Serve config accept:
``models:/name@alias``, ``name@alias``, ``models:/name/version``, an MLflow run id, or a
checkpoint folder. One layout says where the files the steps write for a model live:

    <run artifacts>/checkpoint/   model.safetensors + config.json   (`insight train`, a sweep trial)
    <run artifacts>/concepts/     the concept table, hierarchy, galleries/   (`insight concepts`)
    <run artifacts>/probe/        the concept-bottleneck probe   (`insight evaluate --probe`)

``<run artifacts>`` is the model's MLflow run (the model version's run), which `load_model`
fetches whole; a model given as a checkpoint folder keeps ``concepts/`` and ``probe/`` beside
that folder instead. Steps put what they make there with `attach`; readers ask
`LoadedModel.folders`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint"  # the SAE's weights and training config
CONCEPTS = "concepts"  # the concept table `insight concepts` mines (`insight.concepts.run`)
GALLERIES = "galleries"  # inside CONCEPTS: one PNG per concept (`insight.concepts.galleries.gallery_name`)
PROBE = "probe"  # the concept-bottleneck probe (`insight.tasks.classification.ConceptProbe`)

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_NAME_AT_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*@[A-Za-z0-9_-]+")
_REF_FORMS = "models:/name@alias, name@alias, models:/name/version, an MLflow run id, or a checkpoint folder"
_SWEEP_FIRST = ("`insight sweep --config <the same config>` registers its best trial as"
                " models:/<tracking.registered_model>@<tracking.alias>")


# ---------------------------------------------------------------- references


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a checkpoint folder, a run id, or a registered name with an alias or version."""

    folder: Path | None = None  # the checkpoint folder itself (absolute; a final model's ``sae/`` resolved)
    run_id: str | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        """The canonical spelling: what every step, replica and log line passes on."""
        if self.folder is not None:
            return str(self.folder)
        if self.run_id:
            return self.run_id
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_ref(ref: str) -> ModelRef:
    """Read a model reference without touching a store; ValueError says what forms exist.

    An existing folder wins over any other reading; it must hold an SAE checkpoint (its
    ``config.json``, or that of its ``sae/`` subfolder as `insight train` writes a final model).
    """
    ref = str(ref).strip()
    folder = Path(ref).expanduser()
    if ref and folder.is_dir():
        if not (folder / "config.json").is_file() and (folder / "sae" / "config.json").is_file():
            folder = folder / "sae"
        if not (folder / "config.json").is_file():
            raise ValueError(f"--model {ref}: the folder holds no SAE checkpoint (config.json); give the folder"
                             " `insight train` wrote (its checkpoint or its final model)")
        return ModelRef(folder=folder.resolve())
    if _RUN_ID.fullmatch(ref):
        return ModelRef(run_id=ref)
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        name, sep, alias = body.partition("@")
        if sep:
            if name and alias and "/" not in name:
                return ModelRef(name=name, alias=alias)
        else:
            name, _, version = body.rpartition("/")
            if name and version:
                return ModelRef(name=name, version=version)
        raise ValueError(f"--model {ref!r}: expected {_REF_FORMS}")
    if _NAME_AT_ALIAS.fullmatch(ref):
        name, _, alias = ref.partition("@")
        return ModelRef(name=name, alias=alias)
    if "/" in ref or os.sep in ref or ref.startswith((".", "~")):
        raise ValueError(f"--model {ref}: folder not found; give an existing checkpoint folder,"
                         " models:/name@alias, models:/name/version or an MLflow run id")
    raise ValueError(f"--model {ref!r}: no folder of that name, and no model reference: expected {_REF_FORMS}")


def champion_ref(cfg: Any) -> str:
    """The model a step uses when none is named: the registry alias the sweep moves to its best trial."""
    return f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"


# ---------------------------------------------------------------- loaded models


@dataclass
class LoadedModel:
    """A trained SAE with everything later steps need to use it."""

    sae: Any  # insight.sae.MatryoshkaSAE
    config: Any  # InsightConfig the model was trained with
    checkpoint: Path  # local folder with model.safetensors + config.json
    run_id: str | None = None
    version: str | None = None
    name: str | None = None
    artifacts: Path | None = None  # local copy of the run's artifacts (concepts, probe) when fetched
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        if self.name and self.version:
            return f"models:/{self.name}/{self.version}"
        if self.run_id:
            return f"runs:/{self.run_id}/{CHECKPOINT}"
        return str(self.checkpoint)

    def folders(self, kind: str) -> list[Path]:
        """Where this model's ``kind`` folder (CONCEPTS, PROBE) may be, in order: the fetched run's
        artifact folder, then the folder beside the checkpoint (see the module docstring)."""
        places = ([Path(self.artifacts) / kind] if self.artifacts else []) + [Path(self.checkpoint).parent / kind]
        return list(dict.fromkeys(places))

    @property
    def concepts(self) -> Any:
        """The concept table `insight concepts` mined for this model (`insight.concepts.ConceptTable`)."""
        from insight.concepts.table import ConceptTable

        places = self.folders(CONCEPTS)
        for folder in places:
            if (folder / "concepts.parquet").is_file() or (folder / "concepts.json").is_file():
                return ConceptTable.load(folder)
        raise FileNotFoundError(f"model {self.uri} has no concept table (looked in "
                                f"{', '.join(str(p) for p in places)}); run `insight concepts --model ...` first")

    def probe_folder(self) -> Path | None:
        """The folder of the probe `insight evaluate --probe` trained for this model, if it has one."""
        return next((f for f in self.folders(PROBE) if (f / "probe.json").is_file()), None)


def attach(model: LoadedModel, kind: str, folder: Path, client: Any, step_run_id: str) -> str:
    """Make ``folder``, which a step made for ``model``, part of the model where `load_model` finds it.

    A model from MLflow gets it as the artifact folder ``kind/`` of its run, tagged
    ``insight.<kind>_run_id`` with the step's run; a model given as a checkpoint folder gets it
    as ``kind/`` beside that folder (swapped in whole) and logged with the step's own run.
    Returns the id of the run that holds it.
    """
    from insight.atomic import swap_in_folder

    folder = Path(folder)
    if model.run_id:
        client.log_artifacts(model.run_id, str(folder), kind)
        client.set_tag(model.run_id, f"insight.{kind}_run_id", step_run_id)
        return model.run_id
    target = Path(model.checkpoint).resolve().parent / kind
    if folder.resolve() != target:
        stage = target.parent / f".{kind}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(folder, stage)
        swap_in_folder(stage, target)
    client.log_artifacts(step_run_id, str(target), kind)
    return step_run_id


def local_home(model: LoadedModel, kind: str, workdir: str | os.PathLike) -> Path:
    """Where a step builds the model's ``kind`` folder on this machine: beside a checkpoint-folder
    model (where it stays), else ``<workdir>/<kind>/<name>-v<version>`` (or the run id)."""
    if not model.run_id:
        return Path(model.checkpoint).resolve().parent / kind
    tag = f"{model.name}-v{model.version}" if model.version else model.run_id
    return Path(workdir).resolve() / kind / tag


def _from_checkpoint(folder: Path, **extra: Any) -> LoadedModel:
    from insight.config import InsightConfig
    from insight.sae.step import load_checkpoint

    ck = load_checkpoint(folder)
    cfg = InsightConfig.model_validate(ck.config) if ck.config else InsightConfig()
    return LoadedModel(sae=ck.model.eval(), config=cfg, checkpoint=folder, **extra)


# ---------------------------------------------------------------- lookups


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
    from insight.tracking import missing_store

    parsed = parse_ref(ref)
    if parsed.folder is not None:
        return None
    missing = missing_store(tracking_uri)
    if missing is not None:
        raise ValueError(f"--model {ref}: not found: there is no MLflow store at {missing} (nothing was logged with this"
                         f" config yet). {_SWEEP_FIRST}; or pass the --config (or tracking.uri) whose runs made the model:"
                         " each config's workdir holds its own store")
    return _lookup(ref, parsed, tracking_uri)


def _lookup(ref: str, parsed: ModelRef, tracking_uri: str) -> Any:
    """The model version (by alias or version) or run (run id) ``parsed`` names; ValueError says what exists."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if parsed.run_id:
        try:
            return client.get_run(parsed.run_id)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"--model {ref}: not found: no run with this id in {tracking_uri}; `insight ui` lists"
                             " the runs of a config's store") from None
    name = parsed.name
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--model {ref}: not found: no registered model {name!r} in {tracking_uri}; registered models:"
                         f" {_registry_listing(client)}. {_SWEEP_FIRST}") from None
    try:
        if parsed.alias:
            return client.get_model_version_by_alias(name, parsed.alias)
        return client.get_model_version(name, parsed.version)
    except mlflow.exceptions.MlflowException:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted((registered.aliases or {}).items())) or "none"
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        what = f"alias {parsed.alias!r}" if parsed.alias else f"version {parsed.version!r}"
        raise ValueError(f"--model {ref}: not found: model {name!r} has no {what} in {tracking_uri}; its aliases: {aliases};"
                         f" its versions: {', '.join(map(str, versions)) or 'none'}. {_SWEEP_FIRST}"
                         " (tracking.alias names the alias it moves)") from None


def load_model(ref: str, tracking_uri: str | None = None, dst: str | None = None) -> LoadedModel:
    """Load an SAE by any form `parse_ref` reads. Registered models and runs are fetched whole
    (checkpoint, concepts, probe) from the tracking store (``tracking_uri``, else MLflow's current
    one) into ``dst`` (default: a temp folder).
    """
    import tempfile

    parsed = parse_ref(ref)
    if parsed.folder is not None:
        return _from_checkpoint(parsed.folder)
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    found = check_model(ref, tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    name = version = None
    if parsed.run_id:
        run_id = parsed.run_id
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
    ckpt = local / CHECKPOINT
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"run {run_id} has no SAE checkpoint artifact ({CHECKPOINT}/config.json)")
    return _from_checkpoint(ckpt, run_id=run_id, version=version, name=name, artifacts=local,
                            metrics=dict(run.data.metrics))
