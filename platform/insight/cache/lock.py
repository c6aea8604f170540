"""Who may write into a cache folder: one extraction at a time, never the leftovers of a killed one.

`insight extract` holds ``<cache>/.lock`` while it writes: a JSON record of a random run token,
the driver's host, pid and process start time, and a heartbeat the driver refreshes every
`HEARTBEAT_S`. Another extraction of the same cache refuses while that driver lives. A lock whose
driver is gone is taken over with a new token: on the same host as soon as the pid no longer runs
the recorded process, from another host (a retried Kubernetes job on a shared volume) once the
heartbeat is `STALE_S` old.

Ray workers can outlive a killed driver (a Ray Data actor finishes the shards it was handed) and
would otherwise write into the folder while a rerun works there. Every write of a run is guarded
by its token (`guard`): a worker re-reads the lock right before it renames a finished shard or
sidecar into place and drops its file when the token is no longer the current one. Shard files
are renamed whole, so the folder only ever holds complete shards, each written by the run that
held the lock at that moment; a shard whose sidecar is missing is redone by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from insight.cache.format import CacheError, atomic_write, join, read_bytes

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 90.0


class LockLost(CacheError):
    """This run no longer holds the cache folder's lock: another run took it over."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(rec: dict[str, Any]) -> bool | None:
    """Whether the lock's driver still runs: True/False on its own host, None (unknown) elsewhere."""
    if rec.get("host") != socket.gethostname():
        return None
    pid = int(rec.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _start_time(pid)
    return started is None or rec.get("started") in (None, started)


def read_lock(fs: pafs.FileSystem, folder: str) -> dict[str, Any] | None:
    try:
        return json.loads(read_bytes(fs, join(folder, LOCK_NAME)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (the rename is atomic, so damaged): nobody's, taken over


def check_token(fs: pafs.FileSystem, folder: str, token: str, what: str) -> None:
    """Raise LockLost unless ``token`` is the current holder of ``folder``'s lock."""
    rec = read_lock(fs, folder)
    if not rec or rec.get("token") != token:
        holder = f"pid {rec.get('pid')} on {rec.get('host')}" if rec else "nobody"
        raise LockLost(f"{folder}: this extraction no longer holds {LOCK_NAME} (now {holder}); {what} is dropped")


class ExtractionLock:
    """The driver's hold on a cache folder (a context manager); workers get `token` and use `guard`."""

    def __init__(self, fs: pafs.FileSystem, folder: str, stale_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.fs, self.folder = fs, folder
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"token": self.token, "host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
                "heartbeat": time.time()}

    def acquire(self) -> ExtractionLock:
        rec = read_lock(self.fs, self.folder)
        if rec is not None:
            alive = _alive(rec) if rec else None
            age = time.time() - float(rec.get("heartbeat") or 0)
            if alive or (alive is None and age < self.stale_s):
                raise CacheError(
                    f"{self.folder} is being written by another extraction (pid {rec.get('pid')} on "
                    f"{rec.get('host')}, heartbeat {age:.0f} s ago); wait for it to finish or stop it "
                    f"(a lock whose driver is gone is taken over at once on its host, after {self.stale_s:.0f} s "
                    "without a heartbeat elsewhere)")
            log.warning("extract: taking over %s from a run that is gone (pid %s on %s)",
                        self.folder, rec.get("pid"), rec.get("host"))
        atomic_write(self.fs, join(self.folder, LOCK_NAME), json.dumps(self._record()).encode())
        time.sleep(0.05)  # two drivers that started together: the last rename wins, the other sees it
        check_token(self.fs, self.folder, self.token, "the extraction")
        self._beat = threading.Thread(target=self._heartbeat, name="insight-cache-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                check_token(self.fs, self.folder, self.token, "the heartbeat")
                atomic_write(self.fs, join(self.folder, LOCK_NAME), json.dumps(self._record()).encode())
            except LockLost as exc:
                log.error("extract: %s", exc)
                return
            except OSError as exc:  # a transient storage error: the next beat retries
                log.warning("extract: lock heartbeat failed: %s", exc)

    def guard(self, what: str) -> Callable[[], None]:
        """A check for `atomic_write`: raise LockLost if this run lost the folder."""
        return make_guard(self.fs, self.folder, self.token, what)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        rec = read_lock(self.fs, self.folder)
        if rec and rec.get("token") == self.token:
            self.fs.delete_file(join(self.folder, LOCK_NAME))

    def __enter__(self) -> ExtractionLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_guard(fs: pafs.FileSystem, folder: str, token: str, what: str) -> Callable[[], None]:
    return lambda: check_token(fs, folder, token, what)
