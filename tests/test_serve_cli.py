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

import pytest

from conftest import TINY

pytest_plugins = ["serving"]

from serving import free_port, sample_png  # noqa: E402


def _error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def test_cli_serve_answers_and_stops(ray_local, tiny_model, tmp_path):
    """`insight serve --config <config>` as the README says after `make demo`: it finds the config's champion in
    the config's own store; /healthz, /v1/explain with a bundled image, a JSON 4xx; SIGTERM stops it.

    Also: the config is resolved once (the API key from $INSIGHT_SERVE_API_KEY is the one the printed
    line reports and the server requires), and a serve-time ``--set tasks.temperature`` wins over the
    model's training-time value (the answer equals the engine's with that temperature, not the model's).
    """
    import httpx

    port = free_port()
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "insight.cli", "serve", "--config", str(TINY),  # no --model: the champion
           "--set", f"workdir={tiny_model.root}", "--set", f"serve.port={port}", "--set", f"cluster.address={address}",
           "--set", "serve.num_cpus=0.5", "--set", "serve.ingress_cpus=0.25", "--set", "tasks.temperature=7"]
    env = {**os.environ, "INSIGHT_SERVE_API_KEY": "cli-key"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        line = ""
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("{"):
                break
        assert line.startswith("{"), (proc.poll(), proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        out = json.loads(line)
        assert out["ok"] and out["url"] == f"http://127.0.0.1:{port}" and out["api_key"] is True
        assert out["model"] == "models:/insight@champion" and out["tracking_uri"] == tiny_model.tracking_uri
        with httpx.Client(base_url=out["url"], timeout=60) as anon:
            assert anon.get("/healthz").json() == {"status": "ok"}
            _error(anon.get("/v1/model"), 401, "unauthorized")
        image = sample_png("astronaut", 128)
        classes = ["astronaut", "cat", "coffee cup"]
        with httpx.Client(base_url=out["url"], timeout=60, headers={"X-API-Key": "cli-key"}) as c:
            r = c.post("/v1/explain", content=sample_png("coffee"), headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and r.json()["concepts"]
            _error(c.post("/v1/explain", content=b"plain text", headers={"Content-Type": "image/png"}), 400,
                   "invalid_image")
            m = c.get("/v1/model").json()
            assert m["config"]["tasks"]["temperature"] == 7 and "temperature" in m["config"]["tasks_set_at_serve"]
            assert m["uri"] == "models:/insight/1" and str(tiny_model.root) not in json.dumps(m)
            served = c.post("/v1/classify", files={"image": ("a.png", image, "image/png")},
                            data={"classes": ", ".join(classes)}).json()["classes"]
        from serve.engine import Engine, ModelLoader
        from serve.images import center_view, decode_image

        loaded = ModelLoader("models:/insight@champion", tiny_model.tracking_uri, str(tmp_path / "inproc"))()
        assert loaded.config.tasks.temperature != 7  # the model was trained with another value
        view = center_view(decode_image(image, 10**8), 112).pixels
        at_serve = Engine(loaded, tasks={"temperature": 7}).classify(view, classes, 2)["classes"]
        trained = Engine(loaded).classify(view, classes, 2)["classes"]
        assert [x["class"] for x in served] == [x["class"] for x in at_serve]
        assert [x["score"] for x in served] == pytest.approx([x["score"] for x in at_serve], abs=1e-5)
        assert [x["score"] for x in served] != pytest.approx([x["score"] for x in trained], abs=1e-3)
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
