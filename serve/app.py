"""``serve.app:build_app``: the application `serve run`, a RayService and `insight serve` deploy.

Args (the ``args:`` of a Serve config file, all optional)::

    model: models:/insight@champion   # or insight@champion, models:/name/version, a run id, a checkpoint folder
    tracking_uri: sqlite:///...       # default: the config's tracking.uri, $MLFLOW_TRACKING_URI, workdir db
    config: configs/tiny.yaml         # an Insight config whose `serve:` section applies
    set: ["serve.replicas=2"]         # --set style overrides
    serve: {replicas: 2}              # or the serve section's keys directly

Replicas, autoscaling, CPUs/GPUs, batching and request limits come from the
``serve`` section (`insight.config.ServeConfig`); ``host``/``port`` and the
proxy's request timeout belong to `serve.start` (:func:`http_options`, or the
config file's ``http_options``), not to the application.

Task settings: the model's own ``tasks.*`` apply, except the keys this
config sets explicitly (a ``tasks:`` section of ``config`` or ``set``
entries such as ``tasks.temperature=50``), which win (``serve.engine``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ray.serve import Application

ROOT = Path(__file__).resolve().parents[1]
# Replicas run user code and the handle router on their main event loop instead of a thread
# each: two fewer cross-thread hops per request. Safe here because nothing in our handlers
# blocks the loop (decoding and the model run on worker threads).
LATENCY_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# The ingress decodes images of up to ~100s of MB and frees them: with glibc's adaptive mmap threshold,
# such blocks end up on the heap after the first one and its RSS stays high after a barrage; a fixed
# threshold keeps every block over 1 MB in its own mapping, returned to the system when freed.
INGRESS_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
API_KEY_ENV = "INSIGHT_SERVE_API_KEY"  # the API key when serve.api_key is unset
ARG_KEYS = ("model", "tracking_uri", "config", "set", "serve", "dst")


def _ensure_importable() -> None:
    """Replicas import ``serve.*`` by name: put the repository root on their path.

    Ray already adds the driver's working directory to workers' sys.path; this
    also covers a driver started elsewhere (`insight serve` from any folder).
    """
    root = str(ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p]])


def resolve(args: dict[str, Any] | None) -> tuple[Any, str, str]:
    """(InsightConfig, model ref, tracking URI) from build_app's args; ValueError names a bad key."""
    from insight.config import load_config

    args = dict(args or {})
    unknown = sorted(set(args) - set(ARG_KEYS))
    if unknown:
        raise ValueError(f"serve.app:build_app: unknown args {unknown}; allowed: {', '.join(ARG_KEYS)}")
    sets = args.get("set") or []
    if isinstance(sets, str):
        sets = [sets]
    sets = list(sets)
    for key, value in (args.get("serve") or {}).items():
        sets.append(f"serve.{key}={json.dumps(value)}")
    cfg = load_config(args.get("config"), sets)
    if not cfg.serve.api_key and os.environ.get(API_KEY_ENV):  # a Secret on Kubernetes: never in a config file
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key": os.environ[API_KEY_ENV]})})
    from insight.models import champion_ref, parse_ref

    ref = parse_ref(str(args.get("model") or champion_ref(cfg))).uri  # canonical: an absolute folder for replicas
    uri = args.get("tracking_uri") or cfg.tracking.resolved_uri(cfg.workdir)
    return cfg, ref, uri


def check_model(ref: str, tracking_uri: str) -> None:
    """Fail fast, in the caller, on a model that does not exist (replicas would only retry and log).

    `insight.models.check_model`: cheap lookups, no store created, a ValueError naming the ref,
    the store, what exists there and what to run.
    """
    from insight.models import check_model as check

    check(ref, tracking_uri)


def http_options(cfg: Any) -> dict[str, Any]:
    """`serve.start`'s http_options for a config: address, and the proxy's deadline a little past the
    ingress's own (so the app's JSON 408/503 answers first; the proxy's is a backstop)."""
    s = cfg.serve
    return {"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 5}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Insight application: InsightIngress (FastAPI) -> InsightModel (batched)."""
    cfg, ref, uri = resolve(args)
    return application(cfg, ref, uri, dst=(args or {}).get("dst"))


def application(cfg: Any, ref: str, uri: str, dst: str | None = None) -> Application:
    """The application for an already resolved (config, model ref, tracking URI): `insight serve`
    resolves once, checks the model, and deploys this."""
    _ensure_importable()
    from serve.common import ModelLoader
    from serve.deployments import InsightIngress, InsightModel

    s = cfg.serve
    loader = ModelLoader(ref=ref, tracking_uri=uri, dst=dst)
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], **LATENCY_ENV}}
    model_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": env},
        "max_ongoing_requests": max(16, 2 * s.max_batch_size),
        # batching as user_config: a redeploy that changes only these reconfigures in place (no model reload)
        "user_config": {"max_batch_size": s.max_batch_size, "batch_wait_s": s.batch_wait_s},
    }
    if s.autoscaling:
        model_opts["autoscaling_config"] = dict(s.autoscaling)
    else:
        model_opts["num_replicas"] = s.replicas
    tasks = cfg.tasks.model_dump(mode="json", exclude_unset=True)  # only the keys set at serve time
    model = InsightModel.options(**model_opts).bind(loader, max(1, int(s.num_cpus)), tasks)
    ingress_env = {"env_vars": {**env["env_vars"], **INGRESS_MALLOC_ENV}}
    ingress = InsightIngress.options(
        num_replicas=s.ingress_replicas,
        ray_actor_options={"num_cpus": s.ingress_cpus, "runtime_env": ingress_env},
        max_ongoing_requests=s.ingress_max_ongoing,
    )
    return ingress.bind(model, s.model_dump())
