"""`insight quickstart` (what `make demo` runs) end to end on the tiny profile: every step, the
served explanation, the report in a real browser, and the result line the README promises."""

import json
import math
import subprocess
import sys

from conftest import ROOT, TINY
from serving import free_port
from test_report import open_in_chromium


def test_quickstart_runs_every_step_and_writes_a_report(tmp_path):
    port = free_port()
    sets = [f"workdir={tmp_path}", "sweep.space={sae.k: [8]}", "sweep.num_samples=1", "train.max_steps=10",
            "tasks.classes=annotated", "concepts.vocab_size=300", f"serve.port={port}", "cluster.num_cpus=2"]
    cmd = [sys.executable, "-m", "insight.cli", "quickstart", "--config", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"]
    # Progress: one line per stage, in order.
    stages = [int(line[len("[quickstart "):].split("/")[0]) for line in p.stderr.splitlines()
              if line.startswith("[quickstart ")]
    assert stages == sorted(stages) and set(stages) == set(range(1, 7)), stages

    # The result line: report, registered model, concepts, evaluation ratio, served URL, MLflow command.
    assert out["model_version"] == 1 and out["model"].startswith("models:/insight")
    assert out["concepts"] == 64 * 4  # D * expansion of the tiny profile
    assert 0 < out["concepts_alive"] <= out["concepts"]
    for key in ("miou_concepts", "miou_opaque", "evaluation_ratio"):
        assert isinstance(out[key], float) and math.isfinite(out[key]), (key, out[key])
    assert out["served_url"] == f"http://127.0.0.1:{port}"
    assert len(out["explain_top_concepts"]) == 5 and all(out["explain_top_concepts"])
    assert "--backend-store-uri sqlite:///" in out["mlflow_ui"] and "127.0.0.1" in out["mlflow_ui"]

    # Every step left its MLflow run in the one store the report points at.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("insight")
    steps = {r.data.tags.get("insight.step") for r in client.search_runs([exp.experiment_id], max_results=100)}
    assert {"extract", "sweep", "concepts", "evaluate"} <= steps, steps
    assert str(client.get_model_version_by_alias("insight", "champion").version) == "1"

    # The report opens in headless Chromium with no errors, pictures decoded, sections present.
    facts, errors = open_in_chromium(tmp_path / "report.html", tmp_path / "report.png")
    assert not errors, errors
    assert facts["images"] >= 4 and all(w > 0 for w in facts["widths"]), facts["widths"]
    for section in ("Sweep", "Concepts", "Evaluation", "Served explanation"):
        assert section in facts["text"]
    assert (tmp_path / "report.png").stat().st_size > 20000
