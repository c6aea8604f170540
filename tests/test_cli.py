"""The `insight` CLI as a user runs it: config errors up front, JSON as the last stdout line."""

import json
import subprocess
import sys

from conftest import ROOT, TINY


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "insight.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_misspelled_key_fails_before_work(tmp_path):
    p = run_cli("extract", "--config", str(TINY), "--set", f"workdir={tmp_path}", "--set", "cache.shard_imgs=3")
    assert p.returncode == 2
    assert "unknown key 'cache.shard_imgs'" in p.stderr and "did you mean 'cache.shard_images'" in p.stderr
    out = last_json(p.stdout)
    assert out["ok"] is False and "cache.shard_imgs" in out["error"]
    assert not (tmp_path / "cache").exists()  # nothing started


def test_extract_cli_end_to_end(tmp_path):
    args = ("extract", "--config", str(TINY), "--set", f"workdir={tmp_path}", "--set", "data.max_images=3",
            "--set", "data.views=1")
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    out = last_json(p.stdout)
    assert out["ok"] and out["tokens"] == 3 * 49 and out["new_shards"] == 1 and out["run_id"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    assert run.data.metrics["tokens"] == 3 * 49 and run.data.tags["insight.cache_key"] == out["key"]
    info = run_cli("cache", "info", out["cache"])
    assert last_json(info.stdout)["tokens"] == 3 * 49
    verify = run_cli("cache", "verify", out["cache"])
    assert last_json(verify.stdout)["verified"] is True


def test_config_show_prints_resolved_config():
    p = run_cli("config", "show", "--config", str(TINY), "--set", "sae.k=5")
    cfg = last_json(p.stdout)["config"]
    assert cfg["sae"]["k"] == 5 and cfg["backbone"]["model"] == "insight-tiny-vit"
