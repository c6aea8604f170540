"""Process-level set-up shared by every step: the Ray connection and the offline environment.

Everything here sits at the bottom of the import graph: it imports nothing of the
package, and Ray only inside `ensure_ray`, so tests, benchmarks and the Makefile can
use it before anything heavy is loaded.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

# Defaults for tests, benchmarks and `make`: no downloads or update checks, no usage
# reporting, Ray on loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 binds every Ray
# socket to 127.0.0.1) and without token auth (a private local instance), plots without
# a display. Production keeps Ray's auth on: these are never applied by a step itself.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "MPLBACKEND": "Agg",
}


def offline_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every `OFFLINE_ENV` default that ``environ`` (default: os.environ) does not set yet.

    A value the caller already set wins (``HF_HUB_OFFLINE=0`` lets a run download).
    Returns the variables that were added."""
    environ = os.environ if environ is None else environ
    added = {k: v for k, v in OFFLINE_ENV.items() if k not in environ}
    environ.update(added)
    return added


def ensure_ray(cfg) -> None:
    """Start or join Ray for a step of ``cfg`` (no-op when Ray is already initialised).

    Inside a Ray job the step joins the job's cluster; else ``cluster.address`` when set;
    else a private local instance (``address="local"``), never whatever `ray start` last
    left running on this machine."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    # A step submitted as a Ray job (`insight submit`, KubeRay RayJob) joins the cluster that runs
    # the job: Ray's job supervisor sets RAY_ADDRESS and this variable for the driver, and passing
    # cluster.num_cpus (or another address) when joining a running cluster is an error.
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if not in_ray_job and cfg.cluster.address:
        kwargs["address"] = cfg.cluster.address
    elif not in_ray_job and not os.environ.get("RAY_ADDRESS"):
        # No address configured means a private local instance: plain ray.init() would attach to
        # whatever cluster `ray start` last left running on this machine.
        kwargs["address"] = "local"
        if cfg.cluster.num_cpus:
            kwargs["num_cpus"] = cfg.cluster.num_cpus
    ray.init(**kwargs)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except AttributeError:  # pragma: no cover - older Ray
        pass


def serve_app_module() -> Any:
    """`serve.app` of this checkout (the Serve application): from the repository root beside
    platform/, else from the working directory (an installed package has no serve/ of its own)."""
    import importlib
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    for root in (here.parents[2], Path.cwd()):
        if (root / "serve" / "app.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("serve.app")
    raise FileNotFoundError("cannot find serve/app.py (the Serve application) beside platform/ or in the working"
                            " directory")


if __name__ == "__main__":  # `python -m insight.runtime`: the defaults as KEY=VALUE lines (the Makefile reads them)
    for key, value in OFFLINE_ENV.items():
        print(f"{key}={value}")
