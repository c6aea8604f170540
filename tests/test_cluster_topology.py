"""The production topology on one machine, from nothing: PostgreSQL, moto's S3 server, an MLflow
server on both and a 3-node Ray cluster (insight.localcluster, what `make cluster-up` starts).

The tiny pipeline (extract -> sweep -> concepts -> evaluate -> serve) goes through `insight submit`
with cluster.address, tracking.uri and an s3:// cache.root, as on Kubernetes, and the champion is
served from the server's registry and asked over HTTP; on the way the MLflow server is restarted
during the sweep, and worker nodes are killed during extraction and during SAE training. Marked `cluster`: `make test-cluster` runs it, the
default `make test` deselects it (pyproject addopts). Every process it starts is stopped by the
module fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CACHE_ROOT = "s3://insight/cache"  # as k8s/overlays/prod/insight.yaml sets it
# The tiny profile cut to what a loaded 2-core machine runs in minutes: its 25 bundled images x 2 views.
SMALL = ["data.views=2", "sweep.num_samples=2", "sweep.max_concurrent=2",
         "train.epochs=3", "concepts.vocab_size=200"]


@pytest.fixture(scope="module")
def topo():
    from insight.localcluster import up

    root = Path(tempfile.mkdtemp(prefix="insight-topo-"))
    cluster = up(root)  # stops what it started if a component fails to come up
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def workdir(topo):
    """The shared volume of the cluster (/mnt/insight on Kubernetes): one folder every node sees."""
    return topo.root / "shared"


def _submit(topo, workdir, step: str, *sets: str, follow: bool = True, timeout: float = 1200,
            step_args: tuple[str, ...] = ()) -> tuple[dict, str]:
    """`insight submit STEP` as a user on the client machine does: no storage keys, settings by --set."""
    args = [str(VENV_BIN / "insight"), "submit", step, "--config", "configs/tiny.yaml",
            "--set", f"cluster.address={topo.urls['ray_dashboard']}", "--set", f"tracking.uri={topo.urls['mlflow']}",
            "--set", f"cache.root={CACHE_ROOT}", "--set", f"workdir={workdir}",
            *[a for s in (*SMALL, *sets) for a in ("--set", s)]]
    if follow:
        args.append("--follow")
    if step_args:
        args += ["--", *step_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1])
    assert proc.returncode == 0 and res["ok"], proc.stdout[-6000:] + proc.stderr[-3000:]
    # The output names the Ray dashboard the job runs on (its page), on stderr too while following.
    assert res["address"] == topo.urls["ray_dashboard"], res
    assert res["dashboard"] == f"{topo.urls['ray_dashboard']}/#/jobs/{res['job_id']}", res
    assert not follow or res["dashboard"] in proc.stderr, proc.stderr[-2000:]
    return res, proc.stdout


def _step_result(out: str, key: str) -> dict:
    """The step's own JSON line in the followed job logs."""
    found = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{") and f'"{key}"' in ln]
    assert found, out[-3000:]
    return found[-1]


def _follow(topo, job_id: str, timeout: float = 1200) -> str:
    proc = subprocess.run([str(VENV_BIN / "insight"), "jobs", "logs", job_id, "--follow",
                           "--address", topo.urls["ray_dashboard"]],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    status = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert status["status"] == "SUCCEEDED", proc.stdout[-6000:]
    return proc.stdout


def _s3(topo):
    import boto3

    return boto3.client("s3", endpoint_url=topo.urls["s3"], region_name=topo.env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=topo.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=topo.env["AWS_SECRET_ACCESS_KEY"])


def _cache_ids(topo, cache: str) -> list[str]:
    """Every image id in the cache's shards, read through pyarrow's S3 filesystem like the steps do."""
    from insight.cache.format import CacheReader

    saved = {k: os.environ.get(k) for k in topo.env}
    os.environ.update(topo.env)
    try:
        reader = CacheReader(cache)
        ids: list[str] = []
        for info in reader.manifest.shards:
            ids += reader.read_shard(info)[0]
        return ids
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_until(what: str, cond, timeout: float = 600, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _worker_nodes_of(topo, class_name: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=topo.urls["ray_dashboard"], filters=[("state", "=", "ALIVE")], limit=1000,
                         raise_on_missing_output=False)
    return {topo.node_name(a.node_id) for a in actors if class_name in (a.class_name or "") and a.node_id}


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, body) of one request to a loopback URL (an HTTP error status is an answer too)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback URL the test built
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.timeout(3000)
def test_pipeline_on_the_topology(topo, workdir):
    from mlflow import MlflowClient

    assert sorted(n for n in topo.procs if n.startswith("ray-")) == ["ray-head", "ray-worker-1", "ray-worker-2"]
    assert sorted(topo.alive_nodes().values()) == ["ray-head", "ray-worker-1", "ray-worker-2"]
    status, _ = _http("GET", topo.urls["ray_dashboard"])  # the dashboard's page, on 127.0.0.1
    assert status == 200 and topo.urls["ray_dashboard"].startswith("http://127.0.0.1:")

    # extract: shards land in the bucket, every image once.
    res, out = _submit(topo, workdir, "extract")
    assert res["status"] == "SUCCEEDED" and res["address"] == topo.urls["ray_dashboard"]
    ext = _step_result(out, "new_shards")
    assert ext["cache"].startswith(f"{CACHE_ROOT}/") and ext["images"] == 50 and ext["new_shards"] >= 3
    keys = [o["Key"] for o in _s3(topo).list_objects_v2(Bucket="insight", Prefix=f"cache/{ext['key']}/")["Contents"]]
    assert sum(k.endswith(".parquet") for k in keys) == ext["shards"] and f"cache/{ext['key']}/manifest.json" in keys
    ids = _cache_ids(topo, ext["cache"])
    assert len(ids) == len(set(ids)) == 50

    # sweep, with the MLflow server restarted while its trials run: nothing lost, nothing left RUNNING.
    client = MlflowClient(topo.urls["mlflow"])
    sub, _ = _submit(topo, workdir, "sweep", follow=False)
    exp = _wait_until("the insight experiment", lambda: client.get_experiment_by_name("insight"), every=3)

    def running_trial():
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
        return [r for r in runs if r.data.tags.get("mlflow.parentRunId")]

    _wait_until("a running trial", running_trial, every=3)
    topo.restart_mlflow()
    sw = _step_result(_follow(topo, sub["job_id"]), "parent_run_id")
    runs = MlflowClient(topo.urls["mlflow"]).search_runs([exp.experiment_id], max_results=500)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sw["parent_run_id"]]
    # A trial ASHA stopped, or whose end fell into the restart, is KILLED; none stays RUNNING.
    assert len(children) == sw["trials"] == 2 and {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    assert client.get_run(sw["best_run_id"]).info.status == "FINISHED"
    assert Path(sw["pareto_plot"]).name in {a.path for a in client.list_artifacts(sw["parent_run_id"])}
    champion = client.get_model_version_by_alias("insight", "champion")
    assert champion.run_id in {r.info.run_id for r in children}
    # MLflow's artifacts went to the object store, through the server.
    assert _s3(topo).list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["KeyCount"] > 0

    # concepts and evaluate load models:/insight@champion from the server's registry.
    _submit(topo, workdir, "concepts")
    ev, ev_out = _submit(topo, workdir, "evaluate")
    assert ev["status"] == "SUCCEEDED"

    # serve: `insight submit serve -- --no-blocking` deploys the registry's champion onto the cluster
    # (Serve outlives the job); its proxy answers on 127.0.0.1 until Serve is shut down.
    from insight.localcluster import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        sv, sv_out = _submit(topo, workdir, "serve", "serve.host=127.0.0.1", f"serve.port={port}",
                             step_args=("--no-blocking",))
        served = _step_result(sv_out, "docs")
        assert served["url"] == base and served["model"] == "models:/insight@champion", served
        assert served["tracking_uri"] == topo.urls["mlflow"] and served["blocking"] is False
        status, body = _http("GET", f"{base}/healthz")
        assert status == 200, body[:500]
        from skimage import data as skdata

        from serving import png_bytes

        status, body = _http("POST", f"{base}/v1/explain?top_k=4", png_bytes(skdata.chelsea()),
                             {"Content-Type": "image/png"})
        assert status == 200, body[:2000]
        answer = json.loads(body)
        # The alias resolved in the server's registry: the version the sweep registered as champion.
        assert answer["model"]["uri"] == f"models:/insight/{champion.version}", answer["model"]
        assert answer["grid"] == [7, 7] and 1 <= len(answer["concepts"]) <= 4
        scores = [c["score"] for c in answer["concepts"]]
        assert scores == sorted(scores, reverse=True) and scores[-1] > 0 and answer["fidelity"]["l0"] > 0
    finally:
        # Serve's REST API on the dashboard (what `serve shutdown --address` calls): every app and proxy goes.
        _http("DELETE", f"{topo.urls['ray_dashboard']}/api/serve/applications/", timeout=120)
    _wait_until("Serve to shut down", lambda: _refused(f"{base}/healthz"), timeout=180, every=2)


def _refused(url: str) -> bool:
    """Nothing listens on the URL's port any more."""
    import urllib.error

    try:
        _http("GET", url, timeout=5)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return True
    return False


CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]  # as tests/test_serve_browser.py


@pytest.mark.timeout(600)
def test_mlflow_ui_shows_the_sweep_and_the_champion(topo):
    """The MLflow server's own UI in headless chromium: parent run with its trials, the Pareto plot, the alias."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (apt-get, as root)")
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(topo.urls["mlflow"])
    exp = client.get_experiment_by_name("insight")
    champion = client.get_model_version_by_alias("insight", "champion")
    parent_id = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    trials = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    base = topo.urls["mlflow"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(90_000)
            # The experiment's training-run table: the sweep's parent run, expanded, lists its trials.
            page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs")
            row = page.locator("[role=row]", has_text=parent.info.run_name).first
            row.wait_for()
            row.locator("button").first.click()  # the run-name cell's expander
            for t in trials:
                page.get_by_text(t.info.run_name, exact=True).first.wait_for()
            # The parent run's artifacts: the Pareto plot.
            page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent_id}/artifacts")
            page.get_by_text("pareto.png", exact=True).first.wait_for()
            # The registered model's versions, the sweep's choice carrying the alias.
            page.goto(f"{base}/#/models/insight")
            page.get_by_text("@ champion", exact=False).first.wait_for()
            body = page.inner_text("body")
            assert f"Version {champion.version}" in body, body[-2000:]
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- page text ---\n{page.inner_text('body')[:3000]}") from exc
        finally:
            browser.close()


@pytest.mark.timeout(1500)
def test_extraction_survives_a_lost_node_on_rerun(topo, workdir):
    """The node extracting dies mid-way; the rerun completes the cache: every image once."""
    sets = ("data.views=4",)  # another cache key than the pipeline's: 100 images
    sub, _ = _submit(topo, workdir, "extract", *sets, follow=False)
    s3 = _s3(topo)

    def shards_of_new_key():
        objs = s3.list_objects_v2(Bucket="insight", Prefix="cache/").get("Contents", [])
        keys = {o["Key"].split("/")[1] for o in objs}
        done = {k for k in keys if f"cache/{k}/manifest.json" in {o["Key"] for o in objs}}
        partial = [o["Key"] for o in objs if o["Key"].split("/")[1] not in done and o["Key"].endswith(".parquet")]
        return partial

    _wait_until("a first shard", shards_of_new_key, timeout=900, every=0.5)
    victims = _worker_nodes_of(topo, "ShardWorker") - {"ray-head"}
    victim = sorted(victims)[0] if victims else "ray-worker-1"
    topo.kill(victim)
    # Ray may finish the job on the other node or fail it; either way it must end (stopped if it hangs).
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(topo.urls["ray_dashboard"])
    try:
        _wait_until("the first extraction to end", lambda: jobs.get_job_status(sub["job_id"]).is_terminal(),
                    timeout=300, every=2)
    except AssertionError:
        jobs.stop_job(sub["job_id"])
        _wait_until("the stopped extraction", lambda: jobs.get_job_status(sub["job_id"]).is_terminal(), every=2)
    topo.add_ray_worker(int(victim.rsplit("-", 1)[1]))
    topo.wait_for_nodes(3)
    res, out = _submit(topo, workdir, "extract", *sets)
    ext = _step_result(out, "new_shards")
    assert ext["images"] == 100 and ext["skipped"] == 0
    ids = _cache_ids(topo, ext["cache"])
    assert len(ids) == len(set(ids)) == 100


@pytest.mark.timeout(2400)
def test_training_survives_a_lost_node(topo, workdir):
    """A worker node's raylet is killed during SAE training: the run resumes from its last checkpoint
    on the other node and ends where an undisturbed run ends (validation FVU within 0.05 + 10 %)."""
    sets = ("train.num_workers=2", "train.max_failures=2", "train.batch_size=64", "train.epochs=6",
            "train.checkpoint_every=10")
    _submit(topo, workdir, "extract")  # the pipeline's cache (a no-op after test_pipeline_on_the_topology)
    _, ref_out = _submit(topo, workdir, "train", *sets, "train.run_name=undisturbed")
    ref = _step_result(ref_out, "val_fvu")
    sub, _ = _submit(topo, workdir, "train", *sets, "train.run_name=lossy", follow=False)
    storage = workdir / "ray" / "lossy"
    snapshot = storage / "checkpoint_manager_snapshot.json"  # Train's record of the checkpoints it registered
    _wait_until("a registered checkpoint", lambda: snapshot.is_file() and "checkpoint_" in snapshot.read_text(),
                timeout=900, every=0.5)
    nodes = _worker_nodes_of(topo, "RayTrainWorker") - {"ray-head"}
    assert nodes, "no live Train worker found"
    victim = sorted(nodes)[0]
    topo.kill(victim)  # not replaced: the run must finish on the nodes left
    out = _follow(topo, sub["job_id"])
    assert victim not in topo.alive_nodes().values()
    res = _step_result(out, "val_fvu")
    why = "\n".join(ln[:300] for ln in out.splitlines() if any(w in ln.lower() for w in ("resum", "restor", "fail", "retry")))
    assert ref["resumed_from"] == -1 and res["resumed_from"] > 0, (res, ref, why)  # restored from a checkpoint
    print(f"node loss: resumed from step {res['resumed_from']} of {res['steps']}; val FVU {res['val_fvu']:.4f}"
          f" vs undisturbed {ref['val_fvu']:.4f}")
    assert res["steps"] == ref["steps"]
    assert abs(res["val_fvu"] - ref["val_fvu"]) <= 0.05 + 0.1 * ref["val_fvu"], (res, ref)
