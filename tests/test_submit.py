"""`insight submit` / `insight jobs` against a real local Ray cluster started here.

The head runs from the project venv (so job drivers use its python), binds to
127.0.0.1 on free ports, and lives in its own temp dir; teardown kills exactly
the processes started for it (never `ray stop`, which would hit every Ray on
the machine).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import free_port, wait_until
from insight.runtime import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = "configs/tiny.yaml"


def _cluster_processes(temp_dir: str, root_pid: int | None) -> list[psutil.Process]:
    """Every process of this cluster: descendants of `ray start` plus anything naming its temp dir."""
    found: dict[int, psutil.Process] = {}
    if root_pid is not None:
        try:
            root = psutil.Process(root_pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _kill_cluster(temp_dir: str, root_pid: int | None) -> None:
    procs = _cluster_processes(temp_dir, root_pid)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive + _cluster_processes(temp_dir, None):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    import requests

    wait_until(f"ray dashboard at {address}", lambda: requests.get(f"{address}/api/version", timeout=2).status_code == 200,
               timeout_s, proc=proc, log=log)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU head with the dashboard on 127.0.0.1, auth disabled; yields its dashboard URL."""
    temp_dir = tempfile.mkdtemp(prefix="insight-ray-")  # short: Ray's socket paths must fit 107 bytes
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    worker_base = random.randrange(20000, 29000, 100)
    env = {**os.environ, **OFFLINE_ENV, "INSIGHT_LOG": "INFO", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=True", "--dashboard-host=127.0.0.1",
           f"--temp-dir={temp_dir}", "--object-store-memory=268435456", "--disable-usage-stats",
           f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 99}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = Path(temp_dir) / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir,
                                start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_dashboard(address, proc, log)
        yield address
    finally:
        _kill_cluster(temp_dir, proc.pid)
        proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _insight(*args: str, timeout: float = 300) -> tuple[int, str, str, dict]:
    """Run the real CLI as a user would; returns (rc, stdout, stderr, last-line JSON)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(VENV_BIN / "insight"), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    return proc.returncode, proc.stdout, proc.stderr, last


def _insight_here(*args: str) -> tuple[int, str, dict]:
    """The same CLI in this process (saves the ~2 s interpreter start for quick calls)."""
    from typer.testing import CliRunner

    from insight.cli import app

    result = CliRunner().invoke(app, list(args), env={"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": None})
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    return result.exit_code, result.output, json.loads(lines[-1]) if lines else {}


@pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # inside Ray's own SDK
def test_submit_follow_logs_status_stop(ray_cluster, tmp_path):
    work = tmp_path / "work"
    # A misspelled key in a config outside the project: embedded, submitted first so it runs
    # beside the extract below, and FAILED on the cluster with the config error in its logs.
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / TINY).read_text().replace("shard_images:", "shard_imgs:"))
    rc, _, err, bad = _insight("submit", "extract", "--config", str(broken), "--set", f"workdir={work}",
                               "--address", ray_cluster)
    assert rc == 0 and bad["ok"] and bad["config_travel"] == "embedded", err
    # The same in image mode (the cluster "runs our image"; here its project dir is this checkout):
    # nothing is uploaded, the entrypoint changes into the project dir and writes the embedded config.
    rc, out, img = _insight_here("submit", "extract", "--config", str(broken), "--image", "insight:ray2.60.0-py311",
                                 "--set", f"cluster.project_dir={ROOT}", "--address", ray_cluster)
    assert rc == 0 and img["mode"] == "image" and img["image"] == "insight:ray2.60.0-py311", out
    assert img["entrypoint"].startswith(f"cd {ROOT} && d=$(mktemp -d)")

    rc, out, err, res = _insight(
        "submit", "extract", "--config", TINY, "--set", "data.max_images=2", "--set", "data.views=1",
        "--set", f"workdir={work}", "--address", ray_cluster, "--follow", "--", "--no-track")
    assert rc == 0, err + out[-3000:]
    assert res["ok"] and res["status"] == "SUCCEEDED" and res["job_id"].startswith("insight-extract-")
    assert res["address"] == ray_cluster and res["config_travel"] == "working_dir" and res["mode"] == "upload"
    assert res["entrypoint"].startswith("python jobs/extract.py --config configs/tiny.yaml --set data.max_images=2")
    assert res["entrypoint"].endswith("--no-track")
    # The followed logs carry the step's own JSON result; the cache landed in workdir.
    step_lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"ok": true, "cache"')]
    assert step_lines and step_lines[-1]["new_shards"] == 1 and "run_id" not in step_lines[-1]
    assert Path(step_lines[-1]["cache"], "manifest.json").is_file()

    rc, out, logs = _insight_here("jobs", "logs", res["job_id"], "--address", ray_cluster)
    assert rc == 0 and logs["status"] == "SUCCEEDED", out
    assert step_lines[-1]["key"] in out and '"new_shards": 1' in out
    rc, out, st = _insight_here("jobs", "status", res["job_id"], "--address", ray_cluster)
    assert rc == 0 and st["status"] == "SUCCEEDED", out
    assert st["metadata"]["insight.step"] == "extract" and st["metadata"]["insight.config"] == TINY

    rc, out, err, failed = _insight("jobs", "logs", bad["job_id"], "--address", ray_cluster, "--follow")
    assert rc == 1 and failed["status"] == "FAILED" and not failed["ok"], err
    assert "unknown key 'cache.shard_imgs'" in out and "did you mean 'cache.shard_images'" in out
    assert "broken.yaml" in out  # the step names the file it was given
    rc, out, failed = _insight_here("jobs", "logs", img["job_id"], "--address", ray_cluster, "--follow")
    assert rc == 1 and failed["status"] == "FAILED", out
    assert "unknown key 'cache.shard_imgs'" in out and "broken.yaml" in out

    # A long step (many views) is stopped once it runs.
    rc, out, long = _insight_here("submit", "extract", "--config", TINY, "--set", "data.views=64",
                                  "--set", f"workdir={tmp_path / 'long'}", "--address", ray_cluster)
    assert rc == 0, out
    deadline = time.monotonic() + 60
    while _insight_here("jobs", "status", long["job_id"], "--address", ray_cluster)[2]["status"] == "PENDING":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.5)
    rc, out, stopped = _insight_here("jobs", "stop", long["job_id"], "--address", ray_cluster)
    assert rc == 0 and stopped["stop_requested"] and stopped["status"] == "STOPPED", out

    rc, _, missing = _insight_here("jobs", "status", "insight-nope-0", "--address", ray_cluster)
    assert rc == 2 and not missing["ok"] and "insight-nope-0" in missing["error"]
    rc, _, unknown = _insight_here("submit", "segment", "--config", TINY, "--address", ray_cluster)
    assert rc == 2 and "unknown step 'segment'" in unknown["error"]
    assert all(p.stem.replace("_", "-") in unknown["error"] for p in (ROOT / "jobs").glob("*.py"))


# ------------------------------------------------------------------ without a cluster


def _fake_project(root: Path) -> list[Path]:
    """A project tree with everything the upload must drop beside what it must keep."""
    files = ["jobs/extract.py", "jobs/train_dinoiser.py", "configs/tiny.yaml", "configs/sub/x.yaml",
             "platform/insight/__init__.py", ".venv/lib/big.bin", "venv/x", ".git/HEAD", "outputs/run/c.yaml",
             "mlruns/0/meta.yaml", "node_modules/a/index.js", "bench/__pycache__/b.cpython-311.pyc",
             "jobs/__pycache__/e.pyc", "tiny.egg-info/PKG-INFO", ".pytest_cache/v", "data/w.safetensors",
             "mlflow.db", "private/secret.yaml", "README.md"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x: 1\n")
    (root / ".gitignore").write_text("private/\n")
    return [root / f for f in files]


def test_upload_excludes_match_rays_packager(tmp_path):
    """travels_with_upload agrees file by file with what Ray's own packager zips."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from insight.cluster import UPLOAD_EXCLUDES, travels_with_upload

    root = tmp_path / "proj"
    files = _fake_project(root)
    pkg = tmp_path / "pkg.zip"
    create_package(str(root), pkg, include_parent_dir=False, excludes=list(UPLOAD_EXCLUDES),
                   include_gitignore=True)
    zipped = {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert {"jobs/extract.py", "configs/tiny.yaml", "configs/sub/x.yaml", "README.md"} <= zipped
    for f in files:
        rel = f.relative_to(root).as_posix()
        assert travels_with_upload(f, root.resolve()) == (rel in zipped), rel
    assert not any(n.startswith((".venv/", ".git/", "outputs/", "platform/", "private/")) for n in zipped)


def test_config_travel_and_entrypoints(tmp_path):
    from insight.cluster import EMBED_ENV, ClusterError, build_submission

    root = (tmp_path / "proj").resolve()
    _fake_project(root)
    inside = build_submission("extract", str(root / "configs/tiny.yaml"), ["workdir=/x y"], root=root)
    assert inside.config_travel == "working_dir" and inside.mode == "upload"
    assert inside.entrypoint == "python jobs/extract.py --config configs/tiny.yaml --set 'workdir=/x y'"
    assert inside.runtime_env["working_dir"] == str(root)
    assert inside.runtime_env["py_modules"] == [str(root / "platform" / "insight")]
    assert "env_vars" not in inside.runtime_env

    for cfg in (root / "outputs/run/c.yaml", root / "private/secret.yaml", tmp_path / "elsewhere.yaml"):
        cfg.write_text("name: elsewhere\n")
        sub = build_submission("train-dinoiser", str(cfg), root=root)
        assert sub.config_travel == "embedded", cfg
        assert sub.runtime_env["env_vars"][EMBED_ENV] == "name: elsewhere\n"
        assert f'> "$d"/{cfg.name} && python jobs/train_dinoiser.py --config "$d"/{cfg.name}' in sub.entrypoint

    img = build_submission("extract", str(root / "configs/tiny.yaml"), image="reg/insight:ray2.60.0-py311",
                           project_dir="/home/ray/insight", root=root, env={"A": "1"})
    assert img.mode == "image" and img.config_travel == "embedded"
    assert img.entrypoint.startswith("cd /home/ray/insight && d=$(mktemp -d)")
    assert "working_dir" not in img.runtime_env and img.runtime_env["env_vars"]["A"] == "1"
    assert img.metadata["insight.image"] == "reg/insight:ray2.60.0-py311"

    with pytest.raises(ClusterError, match="available steps: extract, train-dinoiser"):
        build_submission("concepts", root=root)
    with pytest.raises(ClusterError, match="config file not found"):
        build_submission("extract", str(tmp_path / "missing.yaml"), root=root)


def test_embedded_entrypoint_runs_under_posix_sh(tmp_path):
    """The embed prefix writes the config verbatim under its name and keeps the step's exit code."""
    from insight.cluster import build_submission

    root = (tmp_path / "proj").resolve()
    _fake_project(root)
    (root / "jobs/extract.py").write_text(
        "import sys, pathlib\np = pathlib.Path(sys.argv[2])\nprint(p.name, repr(p.read_text()))\nsys.exit(3)\n")
    cfg = tmp_path / "my cfg.yaml"
    cfg.write_text("name: 'quote\"s $HOME `x`'\n")
    sub = build_submission("extract", str(cfg), root=root)
    proc = subprocess.run(["/bin/sh", "-c", sub.entrypoint], cwd=root, capture_output=True, text=True,
                          env={**os.environ, **sub.env_vars, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "my cfg.yaml " + repr(cfg.read_text())


def test_address_and_auth_resolution(monkeypatch, tmp_path):
    from insight.cluster import ClusterError, auth_headers, cluster_settings, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="no cluster address"):
        resolve_address(None)
    assert resolve_address("http://h:8265/") == "http://h:8265"
    assert resolve_address(None, "10.0.0.1:8265") == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example:443")
    assert resolve_address(None) == "https://ray.example:443"
    assert resolve_address(None, "http://cfg:8265") == "http://cfg:8265"
    with pytest.raises(ClusterError, match="cluster.address = 'ray://h:10001' is not a Ray dashboard"):
        resolve_address(None, "ray://h:10001")

    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster: {address: 'http://a:8265'}\nsae: {bogus: 1}\n")
    got = cluster_settings(str(cfg), ["cluster.image=reg/insight:ray2.60.0-py311", "sae.k=oops"])
    assert got["address"] == "http://a:8265" and got["image"] == "reg/insight:ray2.60.0-py311"
    assert got["project_dir"] == "/home/ray/insight"

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok1")
    assert auth_headers() == {"Authorization": "Bearer tok1"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(ClusterError, match="no token found"):
        auth_headers()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("tok2\n")
    assert auth_headers() == {"Authorization": "Bearer tok2"}
    token_file = tmp_path / "t"
    token_file.write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    with pytest.raises(ClusterError, match="token file is empty"):
        auth_headers()
