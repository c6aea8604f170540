"""Test set-up: offline, loopback-only, a small local Ray shared by the session."""

from __future__ import annotations

import os

from insight.runtime import offline_env

offline_env()
os.environ.setdefault("INSIGHT_LOG", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from insight.localcluster import free_port, wait_until  # noqa: E402,F401 - the tests' port and polling helpers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def pytest_collection_modifyitems(session, config, items):
    """Tests that start `insight serve` on the session's Ray (tests/test_serve_cli.py) run after every test
    that uses the shared Serve instance (tests/serving.py `served`), which is shut down by then: a Ray
    cluster holds one Serve, so the CLI would otherwise find its HTTP proxy up on another port and take
    over its app (and API key)."""
    uses = [n for n, it in enumerate(items) if "served" in getattr(it, "fixturenames", ())]
    if not uses:
        return
    moving = [it for it in items[: uses[-1]] if it.path.name == "test_serve_cli.py"]
    if moving:
        rest = [it for it in items if it not in moving]
        last = rest.index(items[uses[-1]])
        items[:] = rest[: last + 1] + moving + rest[last + 1 :]


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; without this, a CLI subprocess
    started by a later test would log to an earlier test's store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture()
def tiny_cfg(tmp_path):
    """The tiny profile with its workdir in a fresh temp folder."""
    from insight.config import load_config

    def make(*overrides: str):
        return load_config(TINY, [f"workdir={tmp_path}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, ray_local):
    """One tiny extraction shared by tests that only read a cache."""
    from insight.cache.extract import extract
    from insight.config import load_config

    work = tmp_path_factory.mktemp("tinycache")
    cfg = load_config(TINY, [f"workdir={work}"])
    result = extract(cfg, progress=False)
    return cfg, result


# The tiny profile's grid over two Matryoshka settings: four real trials, well past
# sae.threshold_start_step (learned inference thresholds) and long enough that the champion's concepts
# have parents (24 steps: none; 60: a few). Steps are cheap here: a trial's cost is Tune's and MLflow's.
CHAMPION_SWEEP = ("sweep.search=grid", "sweep.num_samples=1", "sweep.asha=false",
                  "sweep.space={sae.k: [4, 8], sae.depth: [1, 3]}", "train.max_steps=60")


@dataclass
class TinyChampion:
    root: Path  # the workdir: its mlflow.db is the store where the champion is models:/insight@champion
    tracking_uri: str
    sweep: dict  # what `insight sweep` returned (parent run, best run, trials, Pareto table and plot)
    concepts: dict  # what `insight concepts` returned for models:/insight@champion
    checkpoint: Path  # the champion's checkpoint folder, fetched from the registry after mining

    @property
    def run_id(self) -> str:
        return self.sweep["best_run_id"]

    def other_trials(self) -> list[str]:
        """Run ids of the sweep's other finished trials: real train runs (``checkpoint/``, cache tags) that a
        test may add to (concepts, a probe) without changing what the champion's users see."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        parent = self.sweep["parent_run_id"]
        runs = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        return sorted(r.info.run_id for r in runs if r.info.run_id != self.run_id and r.info.status == "FINISHED")


@pytest.fixture(scope="session")
def tiny_champion(tmp_path_factory, tiny_cache) -> TinyChampion:
    """The pipeline once per session: a real sweep on the shared tiny cache (which registers its
    best trial as models:/insight@champion), then the real concepts step on the champion (table,
    hierarchy and galleries logged to its run). Tests that check these outputs share them; tests
    of a step's own behaviour (ASHA, resume, the CLI) still run that step."""
    from insight.concepts.run import mine_concepts
    from insight.config import load_config
    from insight.models import load_model
    from insight.sweeps.tune import sweep

    root = tmp_path_factory.mktemp("champion")
    _, extracted = tiny_cache
    cfg = load_config(TINY, [f"workdir={root}", f"train.cache={extracted['cache']}", *CHAMPION_SWEEP])
    out = sweep(cfg)
    assert out.get("model") == "models:/insight@champion", out
    uri = cfg.tracking.resolved_uri(cfg.workdir)
    mining = load_config(TINY, [f"workdir={root}", "concepts.gallery_per_group=1", "concepts.vocab_size=200",
                                "concepts.gallery_images=4"])
    concepts = mine_concepts(mining, "models:/insight@champion", cache=extracted["cache"])
    model = load_model("models:/insight@champion", tracking_uri=uri, dst=str(root / "champion"))
    return TinyChampion(root=root, tracking_uri=uri, sweep=out, concepts=concepts, checkpoint=model.checkpoint)


@dataclass
class TinyProbe:
    run_id: str  # the sweep trial (not the champion) that `insight evaluate --probe` trained a probe for
    result: dict  # what evaluate returned
    heldout: int  # how many of the 10 images the probe's validation split holds

    @property
    def folder(self) -> Path:
        """The probe folder the step wrote (the same files it attached to the model's run)."""
        return Path(self.result["out_dir"]) / "probe"


@pytest.fixture(scope="session")
def tiny_probe(tmp_path_factory, tiny_champion) -> TinyProbe:
    """The real evaluate step with ``--probe``, once per session, on 10 bundled images in two class
    folders ("photo", "pattern"), for a non-champion trial of the session's sweep: the served champion
    stays probe-less; tests that need a probe use this step's output."""
    from PIL import Image

    from insight.cache.format import is_validation
    from insight.config import load_config
    from insight.data.samples import sample_images
    from insight.tasks.evaluate import evaluate

    work = tmp_path_factory.mktemp("probe")
    run_id = tiny_champion.other_trials()[-1]
    photos = sample_images()
    ids = [f"{cls}/{name}" for cls, names in {"photo": ["chelsea", "horse", "coffee", "astronaut", "camera"],
                                                "pattern": ["checkerboard", "text", "page", "coins", "gravel"]}.items()
           for name in names]
    for image_id in ids:
        (work / "data" / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[image_id.split("/")[1]]).save(work / "data" / f"{image_id}.png")
    cfg = load_config(TINY, [f"workdir={work}", f"tracking.uri={tiny_champion.tracking_uri}", "data.kind=folder",
                             f"data.root={work / 'data'}", "tasks.pictures=0", "tasks.probe_epochs=2",
                             "tasks.probe_val_fraction=0.2"])
    result = evaluate(cfg, run_id, task="classification", probe=True)
    return TinyProbe(run_id=run_id, result=result, heldout=sum(is_validation(i, 0.2) for i in ids))
