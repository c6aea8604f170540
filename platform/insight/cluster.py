"""Run pipeline steps on a remote Ray cluster through Ray's Job Submission API.

`insight submit <step>` runs ``jobs/<step>.py`` (``-`` in the step name becomes
``_``) as a Ray job; `insight jobs status|logs|stop` manage it. Two ways to get
the code onto the cluster:

* **upload** (default): the project root travels as the job's ``working_dir``
  (minus `UPLOAD_EXCLUDES` and whatever ``.gitignore`` drops; Ray caps the
  package at 512 MiB) and the package ``platform/insight`` travels as a
  ``py_modules`` entry, so ``import insight`` resolves to the submitted code on
  the driver and on every worker. The cluster's Python must already hold the
  dependencies (the image built from the Dockerfile does).
* **image** (``--image`` or ``cluster.image``): the cluster runs the image built
  from the Dockerfile; nothing is uploaded and the entrypoint runs from
  ``cluster.project_dir`` (``/home/ray/insight``) inside it.

How ``--config`` travels: a file inside the project root that the upload keeps
is passed by its relative path and travels with ``working_dir``. Any other file
(outside the project, excluded from the upload, or any file in image mode) is
embedded: its text rides in the runtime env variable `EMBED_ENV` and the
entrypoint writes it to a fresh temp folder under its own file name before the
step starts, so the step validates exactly the file you submitted. Paths that
the config names (data.root, cache.root, checkpoints) must be valid on the
cluster: use shared storage (``s3://...``, a shared volume).

Token auth (Ray >= 2.52, on by default in KubeRay manifests here): requests carry
``Authorization: Bearer <token>`` with the token from ``$RAY_AUTH_TOKEN``, else
the file ``$RAY_AUTH_TOKEN_PATH``, else (only with ``RAY_AUTH_MODE=token``)
``~/.ray/auth_token`` -- the same sources, in the same order, as Ray's own
clients. ``RAY_AUTH_MODE=disabled`` sends no token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# What never travels in an uploaded working_dir (gitwildmatch patterns, relative to the
# project root). No trailing slashes: Ray tests each folder itself against these, and a
# pattern that matches the folder keeps Ray from walking into it (.venv holds gigabytes).
UPLOAD_EXCLUDES: tuple[str, ...] = (
    ".git",
    "/.venv",
    "/venv",
    "/.bench-venv",
    "/.whl",
    "/.gl",
    "/outputs",
    "/mlruns",
    "/mlartifacts",
    "/build",
    "/dist",
    "/platform",  # the package travels as a py_module (see the module docs)
    "node_modules",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "*.db",
    "*.db-journal",
    "*.safetensors",
    "*.ckpt",
    "*.pt",
    "*.parquet",
)
EMBED_ENV = "INSIGHT_SUBMITTED_CONFIG"
MAX_EMBED_BYTES = 64 * 1024  # one environment string stays far below Linux's 128 KiB cap
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(Exception):
    """A submission or job-management problem; the message says what to fix."""


class JobFailed(ClusterError):
    """A followed job ended in FAILED or STOPPED; `result` is the JSON the command prints."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# ------------------------------------------------------------------ the project and its steps


def project_root() -> Path | None:
    """The source checkout whose jobs/ the steps come from: $INSIGHT_PROJECT_ROOT, else the
    checkout this package was imported from (an editable install); None for a plain install."""
    env = os.environ.get("INSIGHT_PROJECT_ROOT")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(Path(__file__).resolve().parents[2])
    for root in candidates:
        if (root / "jobs").is_dir() and (root / "platform" / "insight").is_dir():
            return root.resolve()
    return None


def available_steps(root: Path) -> dict[str, Path]:
    """Step name -> entrypoint, discovered from jobs/*.py (train_dinoiser.py -> train-dinoiser)."""
    return {
        p.stem.replace("_", "-"): p
        for p in sorted((root / "jobs").glob("*.py"))
        if not p.name.startswith("_")
    }


def resolve_step(step: str, root: Path) -> Path:
    steps = available_steps(root)
    name = step.strip().replace("_", "-")
    if name not in steps:
        have = ", ".join(steps) or "none"
        raise ClusterError(
            f"unknown step {step!r}: no entrypoint jobs/{name.replace('-', '_')}.py in {root / 'jobs'};"
            f" available steps: {have}"
        )
    return steps[name]


# ------------------------------------------------------------------ settings, address, auth


def cluster_settings(config: str | None, sets: list[str] | None) -> dict[str, Any]:
    """The config's ``cluster`` section (file + overrides), read without validating the rest.

    Submission must not reject a config the cluster is meant to judge: a step with a broken
    config still runs, fails there, and says why in its logs.
    """
    from insight.config import ClusterConfig, ConfigError, apply_override

    data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ClusterError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            loaded = None
        data = loaded if isinstance(loaded, dict) else {}
    for ov in sets or []:
        if ov.partition("=")[0].strip().startswith("cluster."):
            try:
                apply_override(data, ov)
            except ConfigError as exc:
                raise ClusterError(str(exc)) from None
    section = data.get("cluster")
    section = section if isinstance(section, dict) else {}
    defaults = {name: f.default for name, f in ClusterConfig.model_fields.items()}
    return {**defaults, **{k: v for k, v in section.items() if k in defaults}}


def resolve_address(address: str | None, configured: str | None = None) -> str:
    """--address, else cluster.address, else $RAY_ADDRESS; must be the dashboard's http(s) URL."""
    sources = [("--address", address), ("cluster.address", configured),
               ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))]
    for source, value in sources:
        if not value:
            continue
        value = str(value).strip().rstrip("/")
        if value.startswith(("http://", "https://")):
            return value
        if "://" not in value and value not in ("auto", "local") and ":" in value:
            return f"http://{value}"
        raise ClusterError(
            f"{source} = {value!r} is not a Ray dashboard address: job submission talks to the"
            " dashboard's HTTP API, e.g. http://HOST:8265 (a ray:// client or GCS address does not work)"
        )
    raise ClusterError(
        "no cluster address: pass --address http://HOST:8265, set cluster.address in the --config file"
        " (or --set cluster.address=http://HOST:8265), or export RAY_ADDRESS"
    )


def auth_headers() -> dict[str, str]:
    """The Authorization header for a cluster with Ray token auth, from Ray's own token sources."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path_env:
        path = Path(path_env).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path_env}: cannot read the token file ({exc})") from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path_env}: the token file is empty")
    if not token and mode == "token":
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
        if not token:
            raise ClusterError(
                "RAY_AUTH_MODE=token but no token found: export RAY_AUTH_TOKEN (on KubeRay: kubectl get"
                " secret insight-ray-token -o jsonpath='{.data.auth_token}' | base64 -d), or RAY_AUTH_TOKEN_PATH"
            )
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    """A JobSubmissionClient for `address`, with the token header when one is configured."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except AuthenticationError as exc:
        hint = ("the token was rejected" if headers else
                "the cluster has token auth on and no token was sent: export RAY_AUTH_TOKEN")
        raise ClusterError(f"cluster at {address}: {hint} ({str(exc).splitlines()[0]})") from None
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {exc}") from None


# ------------------------------------------------------------------ building a submission


@dataclass(frozen=True)
class Submission:
    """Everything `submit_job` needs, built without touching the network (testable, printable)."""

    step: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    mode: str  # "upload" | "image"
    config_travel: str  # "none" | "working_dir" | "embedded"
    env_vars: dict[str, str] = field(default_factory=dict)


def _ignore_specs(root: Path, rel: Path) -> list[tuple[Path, Any]]:
    """(folder, PathSpec) for UPLOAD_EXCLUDES and every .gitignore/.rayignore Ray reads on the way."""
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's packager uses

    specs = [(root, PathSpec.from_lines("gitwildmatch", list(UPLOAD_EXCLUDES)))]
    folder = root
    for part in (None, *rel.parts[:-1]):
        folder = folder / part if part else folder
        for name in (".gitignore", ".rayignore"):
            f = folder / name
            if f.is_file():
                specs.append((folder, PathSpec.from_lines("gitwildmatch", f.read_text().splitlines())))
    return specs


def travels_with_upload(path: Path, root: Path) -> bool:
    """Whether Ray's working_dir upload of `root` would carry `path` (a file)."""
    try:
        rel = path.resolve().relative_to(root)
    except ValueError:
        return False
    specs = _ignore_specs(root, rel)
    for depth in range(1, len(rel.parts) + 1):
        sub = Path(*rel.parts[:depth])
        for base, spec in specs:
            try:
                candidate = (root / sub).relative_to(base)
            except ValueError:
                continue
            if spec.match_file(str(candidate)):
                return False
    return True


def build_submission(step: str, config: str | None = None, sets: list[str] | None = None, *,
                     step_args: list[str] | None = None, image: str | None = None,
                     project_dir: str = "/home/ray/insight", env: dict[str, str] | None = None,
                     root: Path | None = None) -> Submission:
    """Entrypoint, runtime env and metadata for one step; raises ClusterError on bad input.

    `step_args` go to the step after --config/--set (e.g. ``--resume`` for train).
    """
    root = root or project_root()
    if root is None:
        if not image:
            raise ClusterError(
                "no project checkout found (jobs/ beside platform/insight): uploading needs one; run from a"
                " source checkout, set INSIGHT_PROJECT_ROOT, or pass --image for a cluster running our image"
            )
        if not step.replace("-", "_").isidentifier():
            raise ClusterError(f"step {step!r} is not a valid step name")
        script = Path("jobs") / f"{step.replace('-', '_')}.py"
    else:
        script = resolve_step(step, root).relative_to(root)
    name = script.stem.replace("_", "-")
    env_vars = dict(env or {})
    if EMBED_ENV in env_vars:
        raise ClusterError(f"--env {EMBED_ENV} is reserved for the submitted config")

    travel = "none"
    config_arg: str | None = None
    if config is not None:
        cfg_path = Path(config).expanduser()
        if not cfg_path.is_file():
            raise ClusterError(f"config file not found: {cfg_path}")
        if not image and root is not None and travels_with_upload(cfg_path, root):
            travel, config_arg = "working_dir", cfg_path.resolve().relative_to(root).as_posix()
        else:
            text = cfg_path.read_text()
            if len(text.encode()) > MAX_EMBED_BYTES:
                raise ClusterError(
                    f"config {cfg_path} is {len(text.encode())} bytes, too large to embed (limit"
                    f" {MAX_EMBED_BYTES}): put it inside the project so it travels with the upload"
                )
            travel = "embedded"
            env_vars[EMBED_ENV] = text

    args = [a for s in sets or [] for a in ("--set", s)] + list(step_args or [])
    if travel == "embedded":
        file_name = shlex.quote(cfg_path.name)
        step_cmd = " ".join(["python", shlex.quote(script.as_posix()), "--config", f'"$d"/{file_name}',
                             *map(shlex.quote, args)])
        # POSIX sh: write the embedded text under its own name, run, clean up, keep the exit code.
        command = (f'd=$(mktemp -d) && printf "%s" "${EMBED_ENV}" > "$d"/{file_name} && {step_cmd};'
                   ' rc=$?; rm -rf "$d"; exit $rc')
    else:
        parts = ["python", script.as_posix()]
        if config_arg is not None:
            parts += ["--config", config_arg]
        command = " ".join(map(shlex.quote, parts + args))

    metadata = {"insight.step": name, "insight.config": str(config or ""), "insight.config_travel": travel}
    if image:
        entrypoint = f"cd {shlex.quote(project_dir)} && {command}"
        runtime_env: dict[str, Any] = {}
        metadata["insight.image"] = image
        mode = "image"
    else:
        assert root is not None
        entrypoint = command
        runtime_env = {"working_dir": str(root), "excludes": list(UPLOAD_EXCLUDES),
                       "py_modules": [str(root / "platform" / "insight")]}
        mode = "upload"
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return Submission(step=name, entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                      mode=mode, config_travel=travel, env_vars=env_vars)


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """--env KEY=VALUE pairs -> dict; names the malformed one."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().replace("_", "A").isalnum():
            raise ClusterError(f"--env expects KEY=VALUE with a variable name, got {pair!r}")
        out[key.strip()] = value
    return out


# ------------------------------------------------------------------ submitting and managing jobs


def _status(client, job_id: str) -> tuple[str, str]:
    info = client.get_job_info(job_id)
    return str(getattr(info.status, "value", info.status)), info.message or ""


def _call(address: str, fn: Callable[[], Any]) -> Any:
    """Turn the SDK's RuntimeError (404 for an unknown job, HTTP failures) into a ClusterError."""
    try:
        return fn()
    except RuntimeError as exc:
        raise ClusterError(f"cluster at {address}: {exc}") from None


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> tuple[str, str]:
    """Poll until the job ends; returns (status, message)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status, message = _status(client, job_id)
        if status in TERMINAL:
            return status, message
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def tail(client, job_id: str, write: Callable[[str], Any]) -> None:
    """Stream the job's logs as they come until the job ends (Ray closes the stream then)."""

    async def run() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(run())


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _finish(client, address: str, job_id: str, result: dict[str, Any], follow: bool) -> dict[str, Any]:
    if follow:
        _call(address, lambda: tail(client, job_id, _write_out))
        status, message = _call(address, lambda: wait(client, job_id))
        result.update(status=status, message=message)
        if status != "SUCCEEDED":
            raise JobFailed(f"job {job_id} {status}: {message}", result)
    return result


def submit(step: str, config: str | None = None, sets: list[str] | None = None, *, address: str | None = None,
           image: str | None = None, env: list[str] | None = None, follow: bool = False,
           submission_id: str | None = None, step_args: list[str] | None = None) -> dict[str, Any]:
    """Submit one step as a Ray job; with `follow`, stream its logs and raise JobFailed unless it succeeds."""
    settings = cluster_settings(config, sets)
    target = resolve_address(address, settings.get("address"))
    image = image or settings.get("image")
    sub = build_submission(step, config, sets, step_args=step_args, image=image,
                           project_dir=str(settings["project_dir"]), env=parse_env(env))
    client = connect(target)
    job_id = submission_id or f"insight-{sub.step}-{uuid.uuid4().hex[:10]}"
    try:
        job_id = client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env or None,
                                   metadata=sub.metadata, submission_id=job_id)
    except (RuntimeError, ValueError) as exc:
        raise ClusterError(f"cluster at {target} refused the job: {exc}") from None
    status, _ = _call(target, lambda: _status(client, job_id))
    # The job's page on the Ray dashboard (logs, tasks, actors, nodes), where to look while it runs.
    dashboard = f"{target.rstrip('/')}/#/jobs/{job_id}"
    result = {"job_id": job_id, "address": target, "dashboard": dashboard, "entrypoint": sub.entrypoint,
              "status": status, "step": sub.step, "mode": sub.mode, "config_travel": sub.config_travel}
    if image:
        result["image"] = image
    if follow:
        print(f"submitted {job_id} to {target} (Ray dashboard: {dashboard}); following its logs"
              " (Ctrl-C stops following, not the job)", file=sys.stderr, flush=True)
    return _finish(client, target, job_id, result, follow)


def job_status(job_id: str, address: str | None = None) -> dict[str, Any]:
    target = resolve_address(address)
    client = connect(target)
    info = _call(target, lambda: client.get_job_info(job_id))
    return {"job_id": job_id, "address": target, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message or "", "entrypoint": info.entrypoint, "metadata": info.metadata or {},
            "start_time": info.start_time, "end_time": info.end_time}


def job_logs(job_id: str, address: str | None = None, follow: bool = False) -> dict[str, Any]:
    """Print the job's logs (all so far, or streamed until it ends with `follow`)."""
    target = resolve_address(address)
    client = connect(target)
    if follow:
        return _finish(client, target, job_id, {"job_id": job_id, "address": target}, True)
    _write_out(_call(target, lambda: client.get_job_logs(job_id)))
    status, message = _call(target, lambda: _status(client, job_id))
    return {"job_id": job_id, "address": target, "status": status, "message": message}


def job_stop(job_id: str, address: str | None = None, wait_s: float = 30.0) -> dict[str, Any]:
    """Ask the job to stop and wait (up to `wait_s`) until Ray reports it ended."""
    target = resolve_address(address)
    client = connect(target)
    requested = bool(_call(target, lambda: client.stop_job(job_id)))
    status, message = _call(target, lambda: wait(client, job_id, timeout_s=wait_s))
    return {"job_id": job_id, "address": target, "stop_requested": requested, "status": status,
            "message": message}
