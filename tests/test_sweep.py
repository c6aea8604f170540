"""Sweeps: MLflow parent/child runs, the champion alias, ASHA, Pareto front, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHAMPION_SWEEP, ROOT, TINY


def _cfg(tiny_cache, workdir, *sets):
    from insight.config import load_config

    _, result = tiny_cache
    return load_config(TINY, [f"workdir={workdir}", f"train.cache={result['cache']}", *sets])


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_sweep_registers_champion_and_draws_pareto(tiny_champion, tiny_cache, tmp_path):
    """The session's sweep (conftest.tiny_champion: the 2x2 grid of CHAMPION_SWEEP, run once and shared
    with the serve, CLI and evaluate tests): child runs, Pareto artifacts, the champion alias."""
    import mlflow

    from insight.models import load_model

    assert "sweep.space={sae.k: [4, 8], sae.depth: [1, 3]}" in CHAMPION_SWEEP
    out = tiny_champion.sweep
    assert out["trials"] == 4 and out["completed_trials"] == 4
    uri = tiny_champion.tracking_uri
    client = mlflow.MlflowClient(uri)
    children = _children(client, out["parent_run_id"])
    assert len(children) == 4
    for run in children:
        assert run.info.status == "FINISHED" and "val_fvu" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "fvu")) >= 2  # a curve, not a point
        assert run.data.tags["insight.cache_key"] == tiny_cache[1]["key"]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "config.json"}
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.tags["insight.best_run_id"] == out["best_run_id"]
    assert {"pareto.png", "trials.csv", "search_space.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert Path(out["pareto_plot"]).stat().st_size > 10_000
    best_child = next(r for r in children if r.info.run_id == out["best_run_id"])
    assert best_child.data.metrics["val_fvu"] == pytest.approx(min(r.data.metrics["val_fvu"] for r in children))

    versions = client.search_model_versions("name='insight'")
    with_alias = [v.version for v in versions if "champion" in client.get_model_version("insight", v.version).aliases]
    assert [str(v) for v in with_alias] == [str(out["model_version"])]
    model = load_model("models:/insight@champion", tracking_uri=uri, dst=str(tmp_path / "loaded"))
    assert model.run_id == out["best_run_id"] and model.config.sae.k == out["best_overrides"]["sae.k"]
    import torch

    z = model.sae.encode_grid(torch.randn(1, 7, 7, 64))
    assert z.shape == (1, 7, 7, 64 * 4) and (z > 0).any()
    again = load_model(out["best_run_id"], tracking_uri=uri, dst=str(tmp_path / "byrun"))
    assert again.checkpoint.is_dir()


def test_asha_stops_a_clearly_worse_trial(tiny_cache, tmp_path):
    from insight.sweeps.tune import sweep

    # Run in order (one at a time): two sane trials, then one that cannot learn.
    cfg = _cfg(tiny_cache, tmp_path, "sweep.search=grid", "sweep.num_samples=1", "sweep.max_concurrent=1",
               "sweep.space={train.lr: [0.001, 0.002, 1.0e-12]}", "sweep.asha_grace_steps=4",
               "train.max_steps=20", "train.log_every=4", "sweep.register_best=false")
    out = sweep(cfg)
    rows = list(__import__("csv").DictReader(open(out["pareto_table"])))
    bad = next(r for r in rows if "1e-12" in r["label"])
    assert bad["completed"] == "False" and int(bad["steps"]) < 20
    assert out["best_overrides"]["train.lr"] in (0.001, 0.002)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_cache, tmp_path):
    import mlflow

    sets = [f"workdir={tmp_path}", f"train.cache={tiny_cache[1]['cache']}", "sweep.search=grid",
            "sweep.num_samples=1", "sweep.max_concurrent=1", "sweep.asha=false",
            "sweep.space={sae.k: [4, 6, 8]}", "train.max_steps=12", "cluster.num_cpus=2"]
    args = [sys.executable, "-m", "insight.cli", "sweep", "--config", str(TINY)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_file = tmp_path / "ray" / "tiny-sweep" / "insight_parent_run.json"
    finished_before: dict[str, float] = {}
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if parent_file.exists():
                done = [r for r in _children(client, json.loads(parent_file.read_text())["run_id"])
                        if r.info.status == "FINISHED"]
                if done:
                    finished_before = {r.data.tags["insight.trial_id"]: r.info.end_time for r in done}
                    break
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert finished_before, "no trial finished in time"

    p = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["trials"] == 3 and out["completed_trials"] == 3
    children = _children(client, out["parent_run_id"])
    by_trial: dict[str, list] = {}
    for r in children:
        by_trial.setdefault(r.data.tags["insight.trial_id"], []).append(r)
    assert len(by_trial) == 3 and all(len(v) == 1 for v in by_trial.values())  # one child run per trial
    for trial, end in finished_before.items():
        assert by_trial[trial][0].info.end_time == end  # finished trials were not run again
