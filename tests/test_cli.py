"""The `insight` CLI as a user runs it: config errors up front, JSON as the last stdout line."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

pytest_plugins = ["serving"]  # tiny_model: a real tiny SAE registered as models:/insight@champion


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "insight.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def invoke(*args, env=None):
    """The CLI in this process (typer's runner): for commands that start nothing, without a Python start-up each."""
    from typer.testing import CliRunner

    from insight.cli import app

    return CliRunner(env=env).invoke(app, list(args))


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


def test_config_show_prints_yaml_with_secrets_masked():
    import yaml

    secret = ("--set", "serve.api_key=s3cret-key", "--set", "tracking.uri=postgresql://u:pa55@db:5432/mlflow")
    p = invoke("config", "show", "--config", str(TINY), "--set", "sae.k=5", *secret)
    assert p.exit_code == 0, p.output
    cfg = yaml.safe_load(p.stdout)  # YAML over many lines, not one line of JSON
    assert cfg["sae"]["k"] == 5 and cfg["backbone"]["model"] == "insight-tiny-vit" and p.stdout.count("\n") > 100
    assert cfg["serve"]["api_key"] == "***" and "s3cret" not in p.stdout and "pa55" not in p.stdout
    p = invoke("config", "show", "--config", str(TINY), "--json", *secret)
    out = last_json(p.stdout)
    assert out["ok"] and out["config"]["serve"]["api_key"] == "***" and "s3cret" not in p.stdout
    p = invoke("config", "show", "--config", str(TINY), "--explain")
    assert "  # Adam learning rate" in p.stdout and yaml.safe_load(p.stdout)["train"]["lr"] == 0.001


def test_config_explain_and_check():
    p = invoke("config", "explain", "tasks.bg_threshold")
    assert p.exit_code == 0 and "tasks.bg_threshold: With a background class" in p.stdout
    assert "type:    number" in p.stdout and "default: 0.99" in p.stdout and ">= 0 and <= 1" in p.stdout
    p = invoke("config", "explain", "tasks.bg_treshold")
    assert p.exit_code == 2 and "did you mean tasks.bg_threshold" in p.stderr
    # `config check` runs what `insight sweep` would reject before its first trial.
    p = invoke("config", "check", "--config", str(ROOT / "configs" / "vit-b16-paper.yaml"))
    assert p.exit_code == 0 and last_json(p.stdout)["ok"], p.output
    p = invoke("config", "check", "--config", str(ROOT / "configs" / "vit-b16-paper.yaml"),
               "--set", "sweep.space={sae.depth: [1, 3, 6]}")
    assert p.exit_code == 2 and "sweep.space.sae.depth choice 1 makes an invalid config" in p.stderr


# ------------------------------------------------------------------ after `make demo` (README), missing models


def _readme_after_demo() -> list[str]:
    """The `insight ...` commands of the README's "After `make demo`" code block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### After `make demo`", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("insight ")]


def test_after_make_demo_commands_find_the_champion_with_their_config(tiny_model, tmp_path):
    """The README's commands, on the tiny profile whose store holds models:/insight@champion: `ui` prints the
    command for that store; `serve` finds the champion with `--config` (tests/test_serve_cli.py serves it so)
    and, without it, names the store it looked in and the fix, creating no store."""
    import mlflow
    import yaml

    from insight.config import load_config
    from insight.models import champion_ref, check_model

    commands = _readme_after_demo()
    assert {c.split()[1] for c in commands} >= {"ui", "serve"}
    assert all("--config configs/quickstart.yaml" in c for c in commands), commands
    profile = yaml.safe_load(TINY.read_text()) | {"workdir": str(tiny_model.root)}  # a config like quickstart.yaml
    demo = tmp_path / "demo.yaml"
    demo.write_text(yaml.safe_dump(profile))
    ui = next(c for c in commands if c.split()[1] == "ui").replace("configs/quickstart.yaml", str(demo))
    p = run_cli(*ui.split()[1:], "--print", cwd=tmp_path)
    out = last_json(p.stdout)
    assert out["tracking_uri"] == tiny_model.tracking_uri and out["store_exists"] is True
    assert f"ui --backend-store-uri {tiny_model.tracking_uri} --host 127.0.0.1 --port 5000" in out["command"]
    assert mlflow.MlflowClient(out["tracking_uri"]).get_model_version_by_alias("insight", "champion")
    cfg = load_config(demo)
    check_model(champion_ref(cfg), cfg.tracking.resolved_uri(cfg.workdir))  # what `serve --config` checks first
    # Without --config: the defaults' store (outputs/mlflow.db of the working directory) has no model.
    p = run_cli("serve", "--no-blocking", cwd=tmp_path)
    assert p.returncode == 2
    err = last_json(p.stdout)["error"]
    assert f"no MLflow store at {tmp_path / 'outputs' / 'mlflow.db'}" in err
    assert "insight sweep --config" in err and "pass the --config" in err
    assert not (tmp_path / "outputs").exists()  # looking for the model created nothing


def test_missing_models_list_what_exists_and_say_what_to_run(tiny_model, tmp_path):
    from insight.models import check_model

    uri = tiny_model.tracking_uri
    with pytest.raises(ValueError) as err:
        check_model("models:/nope@x", uri)
    assert "no registered model 'nope'" in str(err.value) and "insight (aliases: champion -> v1)" in str(err.value)
    assert "`insight sweep --config" in str(err.value)
    with pytest.raises(ValueError) as err:
        check_model("models:/insight@nope", uri)
    assert "model 'insight' has no alias 'nope'" in str(err.value) and "its aliases: champion -> v1" in str(err.value)
    assert "its versions: 1" in str(err.value) and "`insight sweep --config" in str(err.value)
    assert check_model("insight@champion", uri).version == check_model("models:/insight@champion", uri).version
    with pytest.raises(ValueError, match="folder not found"):
        check_model(str(tmp_path / "no-such-checkpoint"), uri)
    store = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(ValueError, match="no MLflow store at"):
        check_model("models:/insight@champion", f"sqlite:///{store}")
    assert not store.parent.exists()


def test_concepts_without_a_champion_says_run_sweep_and_creates_no_store(tmp_path):
    p = invoke("concepts", "--config", str(TINY), "--set", f"workdir={tmp_path / 'work'}")
    assert p.exit_code == 2
    err = last_json(p.stdout)["error"]
    assert "models:/insight@champion: not found" in err and "insight sweep --config" in err
    assert not (tmp_path / "work").exists()


def test_jobs_read_the_cluster_address_from_config(tmp_path):
    """`insight jobs` takes --config/--set like submit, so its "no address" advice can be followed."""
    p = invoke("jobs", "status", "some-job", env={"RAY_ADDRESS": None})
    assert p.exit_code == 2 and "no cluster address" in p.stderr and "cluster.address in the --config file" in p.stderr
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("cluster:\n  address: ray://head:10001\n")
    p = invoke("jobs", "status", "some-job", "--config", str(cfg), env={"RAY_ADDRESS": None})
    assert p.exit_code == 2 and "cluster.address = 'ray://head:10001' is not a Ray dashboard address" in p.stderr


def test_quickstart_finds_its_profile_outside_the_repository(tmp_path, monkeypatch):
    from insight.cli import _quickstart_profile

    monkeypatch.chdir(tmp_path)  # no configs/ here: the checkout's profile
    assert _quickstart_profile() == str(ROOT / "configs" / "quickstart.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("name: mine\n")
    assert _quickstart_profile() == str(tmp_path / "configs" / "quickstart.yaml")  # the working directory's first
