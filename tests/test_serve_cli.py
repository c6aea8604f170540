"""`insight serve` end to end: the command deploys, answers, refuses bad input and stops on SIGTERM.

It runs after test_serve.py and test_serve_browser.py have shut their Serve
down (tests/serving.py), and joins the session's local Ray through
``cluster.address`` instead of starting a second Ray on the 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import TINY

pytest_plugins = ["serving"]

from serving import free_port, sample_png  # noqa: E402


def _error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def test_cli_serve_answers_and_stops(ray_local, tiny_model, tmp_path):
    """`insight serve --model <checkpoint>`: /healthz, /v1/explain with a bundled image, a JSON 4xx; SIGTERM stops it."""
    import httpx

    port = free_port()
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "insight.cli", "serve", "--model", str(tiny_model.checkpoint), "--config", str(TINY),
           "--set", f"workdir={tmp_path}", "--set", f"serve.port={port}", "--set", f"cluster.address={address}",
           "--set", "serve.num_cpus=0.5", "--set", "serve.ingress_cpus=0.25"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = ""
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("{"):
                break
        assert line.startswith("{"), (proc.poll(), proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        out = json.loads(line)
        assert out["ok"] and out["url"] == f"http://127.0.0.1:{port}" and out["api_key"] is False
        assert out["model"] == str(tiny_model.checkpoint)
        with httpx.Client(base_url=out["url"], timeout=60) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            r = c.post("/v1/explain", content=sample_png("coffee"), headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and r.json()["concepts"]
            _error(c.post("/v1/explain", content=b"plain text", headers={"Content-Type": "image/png"}), 400,
                   "invalid_image")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_cli_serve_refuses_a_missing_model(tmp_path):
    p = subprocess.run([sys.executable, "-m", "insight.cli", "serve", "--model", str(tmp_path / "nothing"),
                        "--set", f"workdir={tmp_path}", "--no-blocking"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] is False and "nothing" in out["error"]
