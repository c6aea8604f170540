"""Test set-up: offline, loopback-only, a small local Ray shared by the session."""

from __future__ import annotations

import os

from insight.runtime import offline_env

offline_env()
os.environ.setdefault("INSIGHT_LOG", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


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
