"""The production topology on one machine: PostgreSQL, an S3 server, MLflow and a multi-node Ray.

k8s/ runs Insight as a KubeRay cluster beside PostgreSQL, an S3 object store and an MLflow
server. This module starts the same pieces as plain processes bound to 127.0.0.1, so the
cluster path (``insight submit``, ``cache.root: s3://...``, the MLflow registry on a server)
can be run and debugged before Kubernetes:

    python -m insight.localcluster up      # or `make cluster-up`; prints URLs and the env to export
    python -m insight.localcluster env     # `eval "$(python -m insight.localcluster env)"`
    python -m insight.localcluster down    # or `make cluster-down`; stops exactly what `up` started

The object store is moto's S3 server (in memory: its buckets go with it). Every Ray node gets
the storage environment the pods get from the ConfigMap insight-storage (AWS_ENDPOINT_URL,
MLFLOW_TRACKING_URI, ...), so steps submitted there read and write ``s3://`` like on the
cluster. Each process starts in its own session and is recorded in ``state.json``; ``down``
signals those process groups (and Ray processes naming the cluster's temp dirs), never
``ray stop``, which would hit every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
DEFAULT_DIR = Path(os.environ.get("INSIGHT_CLUSTER_DIR", Path(tempfile.gettempdir()) / "insight-cluster"))
BUCKETS = ("insight", "mlflow")  # the activation cache (s3://insight/cache) and MLflow's artifacts
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "insight", "AWS_SECRET_ACCESS_KEY": "insight-local",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, timeout_s: float, proc: subprocess.Popen | None = None,
               log: Path | None = None, every: float = 0.5):
    """Poll ``ready`` until it returns something truthy, and return that. A ``ready`` that raises
    counts as not ready yet (a server still starting refuses connections); a ``proc`` that exits
    first fails at once with `ProcessExited`, carrying the tail of its ``log``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProcessExited(f"{what}: the process exited with {proc.returncode}:\n{_tail(log)}")
        try:
            got = ready()
        except Exception:  # noqa: BLE001 - not up yet
            got = None
        if got:
            return got
        time.sleep(every)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - loopback URL we built
        return r.status == 200


@dataclass
class LocalCluster:
    """The running topology: where everything listens and which processes belong to it."""

    root: Path
    procs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {pid, log, temp_dir?}
    urls: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # what every pod of the cluster gets

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"procs": self.procs, "urls": self.urls, "env": self.env}, indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        data = json.loads((root / "state.json").read_text())
        return cls(root=root, procs=data["procs"], urls=data["urls"], env=data["env"])

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, user: str | None = None,
               cwd: Path | None = None, **extra: Any) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env or self.base_env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd or self.root, start_new_session=True,
                                    user=user)
        self.procs[name] = {"pid": proc.pid, "log": str(log), **extra}
        self.save()
        return proc

    def base_env(self) -> dict[str, str]:
        env = {**os.environ, **CREDENTIALS, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               # Ray's `ray start --address` refuses to join unless this is 1, even on Linux.
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                    "AWS_PROFILE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(var, None)
        return {**env, **self.env}

    # ------------------------------------------------------------------ components
    def start_postgres(self, timeout_s: float = 120) -> None:
        """PostgreSQL in ``root/pg`` on a free loopback port, trust auth, database ``mlflow``.

        PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user."""
        initdb = _pg_bin("initdb")
        user = "postgres" if os.geteuid() == 0 else None
        data = self.root / "pg"
        data.mkdir(mode=0o700)
        if user:
            shutil.chown(data, user, user)
            os.chmod(self.root, 0o755)
        subprocess.run([initdb, "-D", str(data), "-U", "insight", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, user=user, cwd=data)
        port = free_port()
        log = self.root / "logs" / "postgres.log"
        proc = self._spawn("postgres", [_pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                                        "-k", str(data), "-c", "fsync=off"], user=user, cwd=data)
        url = f"postgresql+psycopg2://insight@127.0.0.1:{port}"

        def ready() -> bool:
            return subprocess.run([_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                  capture_output=True).returncode == 0

        wait_until("postgres", ready, timeout_s, proc=proc, log=log)
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "insight", "mlflow"],
                       check=True, capture_output=True)
        self.urls["postgres"] = f"{url}/mlflow"
        self.save()

    def start_s3(self, timeout_s: float = 120) -> None:
        """moto's S3 server with the buckets ``insight`` (cache) and ``mlflow`` (artifacts)."""
        port = free_port()
        proc = self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_until("moto S3 server", lambda: _http_ok(f"{url}/moto-api/"), timeout_s, proc=proc,
                   log=Path(self.procs["s3"]["log"]))
        self.urls["s3"] = url
        self.env.update({**CREDENTIALS, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url})
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)
        self.save()

    def start_mlflow(self, port: int | None = None, timeout_s: float = 300) -> None:
        """``mlflow server`` on PostgreSQL, proxying artifacts to ``s3://mlflow`` (clients need no S3 keys)."""
        port = port or free_port()
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", self.urls["postgres"], "--serve-artifacts",
               "--artifacts-destination", "s3://mlflow/artifacts"]
        proc = self._spawn("mlflow", cmd, port=port)
        url = f"http://127.0.0.1:{port}"
        wait_until("mlflow server", lambda: _http_ok(f"{url}/health"), timeout_s, proc=proc,
                   log=Path(self.procs["mlflow"]["log"]))
        self.urls["mlflow"] = url
        self.env["MLFLOW_TRACKING_URI"] = url
        self.save()

    def restart_mlflow(self) -> None:
        """Stop the MLflow server and start it again on the same port (its state lives in PostgreSQL and S3)."""
        port = self.procs["mlflow"]["port"]
        self.stop("mlflow")
        self.start_mlflow(port=port)

    def start_ray(self, workers: int = 2, cpus_per_worker: int = 2, timeout_s: float = 180) -> None:
        """A Ray head (no CPUs: work lands on workers, like KubeRay's head) and ``workers`` worker nodes.

        Each node is its own raylet with its own ports and temp dir and a resource ``worker-<i>``
        naming it; all get the storage environment. Workers join one after another, each awaited."""
        head_ports = {"port": free_port(), "dashboard-port": free_port(), "ray-client-server-port": free_port()}
        self._ray_node("ray-head", ["--head", "--num-cpus=0", "--include-dashboard=True",
                                    "--dashboard-host=127.0.0.1", *[f"--{k}={v}" for k, v in head_ports.items()]])
        self.urls["ray_gcs"] = f"127.0.0.1:{head_ports['port']}"
        self.urls["ray_dashboard"] = f"http://127.0.0.1:{head_ports['dashboard-port']}"
        self.save()
        head = self.procs["ray-head"]
        wait_until("ray head", lambda: _http_ok(f"{self.urls['ray_dashboard']}/api/version"), timeout_s,
                   proc=_Pid(head["pid"]), log=Path(head["log"]))
        self._await_node("ray-head", lambda n: n.is_head_node, timeout_s)
        for i in range(1, workers + 1):
            self.add_ray_worker(i, cpus_per_worker, timeout_s=timeout_s)

    def add_ray_worker(self, i: int, cpus: int = 2, timeout_s: float = 180) -> None:
        """Start worker node ``i`` (resource ``worker-<i>``) and wait until the GCS lists it ALIVE.

        ``ray start`` gives a raylet a fixed 30 s to register and exits when it does not, which a
        loaded 2-core machine sometimes exceeds: such a node is started once more."""
        name = f"ray-worker-{i}"
        for attempt in (1, 2):
            before = {n.node_id for n in self._gcs_nodes()}  # a replaced node's old id may still read ALIVE
            self._ray_node(name, [f"--address={self.urls['ray_gcs']}", f"--num-cpus={cpus}",
                                  f"--resources={json.dumps({f'worker-{i}': 1})}"])
            try:
                self._await_node(name, lambda n, old=frozenset(before): f"worker-{i}" in n.resources_total
                                 and n.node_id not in old, timeout_s)
                return
            except ProcessExited:
                if attempt == 2:
                    raise
                self.stop(name)

    def _ray_node(self, name: str, args: list[str]) -> None:
        temp_dir = tempfile.mkdtemp(prefix=f"insight-{name[4:]}-")  # short: Ray's socket paths must fit 107 bytes
        ports = {k: free_port() for k in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                          "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                          "runtime-env-agent-port")}
        # Worker processes bind ports the OS picks (0/0, as ray.cluster_utils does for nodes sharing a
        # machine): no node, of this cluster or another on the machine, shares a worker port range.
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
               "--min-worker-port=0", "--max-worker-port=0",
               *[f"--{k}={v}" for k, v in ports.items()], *args]
        # Every raylet's memory monitor sees the whole machine's memory, not its node's share: on one
        # machine they would kill each other's workers (and the job supervisor) under load.
        env = {**self.base_env(), "RAY_memory_monitor_refresh_ms": "0"}
        self._spawn(name, cmd, env=env, temp_dir=temp_dir, node_manager_port=ports["node-manager-port"])

    def _gcs_nodes(self) -> list:
        """Every node the GCS knows (ALIVE and DEAD), through the state API: the dashboard's own node
        list (``/nodes?view=summary``) trails the GCS by seconds and shows a killed node ALIVE until it notices."""
        from ray.util.state import list_nodes

        return list_nodes(address=self.urls["ray_dashboard"], limit=10_000, timeout=30,
                          raise_on_missing_output=False)

    def _await_node(self, name: str, match, timeout_s: float) -> None:
        """Wait until an ALIVE node satisfying ``match`` exists; record its id as ``name``'s node.
        `ProcessExited` when ``name``'s ``ray start`` ends first."""
        rec = self.procs[name]
        found = wait_until(f"{name} (ALIVE in the GCS)",
                           lambda: [n for n in self._gcs_nodes() if n.state == "ALIVE" and match(n)],
                           timeout_s, proc=_Pid(rec["pid"]), log=Path(rec["log"]), every=1)
        rec["node_id"] = found[0].node_id
        self.save()

    def node_name(self, node_id: str) -> str:
        """Which of our processes (``ray-head``, ``ray-worker-<i>``) is the Ray node ``node_id``.

        By the node id recorded when the node joined: exact across a node replaced under the same name."""
        for name, rec in self.procs.items():
            if rec.get("node_id") == node_id:
                return name
        state = {n.node_id: n.state for n in self._gcs_nodes()}.get(node_id, "unknown to the GCS")
        running = {name: rec.get("node_id") for name, rec in self.procs.items() if name.startswith("ray-")}
        raise KeyError(f"Ray node {node_id} ({state}) is none of this cluster's running nodes {running}")

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> our name of every node the GCS lists ALIVE (a node not started here: '?')."""
        names = {rec["node_id"]: name for name, rec in self.procs.items() if rec.get("node_id")}
        return {n.node_id: names.get(n.node_id, "?") for n in self._gcs_nodes() if n.state == "ALIVE"}

    def wait_for_nodes(self, n: int, timeout_s: float = 180) -> None:
        """Wait until the GCS lists ``n`` ALIVE nodes (a killed one reads ALIVE for ~30 s: after a
        replacement, ``add_ray_worker`` already waited for the new node itself)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception:  # noqa: BLE001 - dashboard still starting
                pass
            for name, rec in self.procs.items():
                if name.startswith("ray-") and not _alive(rec["pid"]):
                    raise RuntimeError(f"{name} exited:\n{_tail(Path(rec['log']))}")
            time.sleep(1)
        raise RuntimeError(f"fewer than {n} Ray nodes alive after {timeout_s:.0f} s")

    # ------------------------------------------------------------------ stop
    def stop(self, name: str, grace_s: float = 10) -> None:
        """SIGTERM the component's process group (and Ray processes naming its temp dir), then SIGKILL."""
        import psutil

        rec = self.procs.pop(name, None)
        if rec is None:
            return
        procs = _members(rec)
        sig = signal.SIGINT if name == "postgres" else signal.SIGTERM  # postgres: fast shutdown
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive + _members(rec):
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if rec.get("temp_dir"):
            shutil.rmtree(rec["temp_dir"], ignore_errors=True)
        self.save()

    def kill(self, name: str) -> None:
        """SIGKILL a component at once, as a node failure does (no graceful shutdown)."""
        import psutil

        rec = self.procs[name]
        for p in _members(rec):
            try:
                p.kill()
            except psutil.Error:
                pass
        self.stop(name, grace_s=1)

    def down(self) -> None:
        order = ["mlflow"] + sorted((n for n in self.procs if n.startswith("ray-worker")), reverse=True)
        order += ["ray-head", "s3", "postgres"]
        for name in order + list(self.procs):
            self.stop(name)
        shutil.rmtree(self.root, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        return {"ok": True, "state": str(self.state_file), **self.urls,
                "ray_address": self.urls.get("ray_dashboard"), "env": self.env,
                "logs": str(self.root / "logs")}


class ProcessExited(RuntimeError):
    """A process `wait_until` watched ended before what it waited for was ready."""


class _Pid:
    """Popen-like ``poll`` for a pid this process did not start."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        self.returncode = None if _alive(self.pid) else -1
        return self.returncode


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _members(rec: dict) -> list:
    """The component's processes: its process group, its descendants and (Ray) anything naming its temp dir."""
    import psutil

    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(rec["pid"])
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    temp_dir = rec.get("temp_dir")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == rec["pid"] or (
                    temp_dir and any(temp_dir in part for part in proc.info["cmdline"] or [])):
                found[proc.pid] = proc
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0)
    for bindir in reversed(versions):
        if (bindir / name).is_file():
            return str(bindir / name)
    raise FileNotFoundError(f"PostgreSQL's {name} not found: install Debian's postgresql (make cluster-up does)")


def up(root: Path = DEFAULT_DIR, workers: int = 2, cpus_per_worker: int = 2) -> LocalCluster:
    """Start everything under ``root`` (which must not hold a running cluster); stops what started on failure."""
    root = Path(root)
    if (root / "state.json").exists():
        raise FileExistsError(f"a local cluster is already recorded in {root}: run `down` first")
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root=root)
    cluster.save()
    try:
        cluster.start_postgres()
        cluster.start_s3()
        cluster.start_mlflow()
        cluster.start_ray(workers=workers, cpus_per_worker=cpus_per_worker)
    except BaseException:
        cluster.down()
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m insight.localcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker nodes beside the head")
    parser.add_argument("--cpus-per-worker", type=int, default=2, help="logical CPUs of each worker node")
    args = parser.parse_args(argv)
    if args.command == "up":
        cluster = up(args.dir, args.workers, args.cpus_per_worker)
        print(json.dumps(cluster.summary(), indent=1))
        print(f"Ray dashboard: {cluster.urls['ray_dashboard']}   MLflow UI: {cluster.urls['mlflow']}", file=sys.stderr)
        print(f'Use it: eval "$({Path(sys.executable).name} -m insight.localcluster env)", then\n  insight submit'
              f" extract --config configs/tiny.yaml --set cache.root=s3://insight/cache", file=sys.stderr)
        return 0
    if not (args.dir / "state.json").exists():
        print(json.dumps({"ok": args.command == "down", "running": False, "state": str(args.dir / "state.json")}))
        return 0 if args.command == "down" else 1
    cluster = LocalCluster.load(args.dir)
    if args.command == "down":
        cluster.down()
        print(json.dumps({"ok": True, "stopped": str(args.dir)}))
    elif args.command == "env":
        env = {**cluster.env, "RAY_ADDRESS": cluster.urls["ray_dashboard"]}
        print("\n".join(f"export {k}={v}" for k, v in env.items()))
    else:
        alive = {name: _alive(rec["pid"]) for name, rec in cluster.procs.items()}
        print(json.dumps({**cluster.summary(), "alive": alive, "ok": all(alive.values())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
