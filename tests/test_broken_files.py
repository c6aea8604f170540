"""Broken files on the training side: truncated and altered shards, verify's exit, killed extractions.

Every case damages a copy of a cache that the real extraction wrote (the session's `tiny_cache`)
and drives the real CLI: a step on a bad cache exits 2 naming the shard and `insight cache verify`,
before Ray Train starts and without a checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY

SHARD = 2  # the shard most tests damage, by position


def shard_file(cache: str | Path, position: int) -> str:
    """The file name of the cache's shard at ``position`` (an extracted shard's name carries its checksum)."""
    from insight.cache import CacheReader

    return CacheReader(str(cache)).manifest.shards[position].name


def invoke(*args):
    """The CLI in this process (typer's runner): for commands that fail before they start Ray."""
    from typer.testing import CliRunner

    from insight.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "insight.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture()
def damaged(tiny_cache, tmp_path):
    """damage(kind, shards=(SHARD,)) -> a copy of the tiny cache with those shards (by position) truncated,
    altered or emptied."""
    _, result = tiny_cache

    def damage(*kinds: str, shards=(SHARD,)) -> Path:
        loc = tmp_path / "cache" / result["key"]
        if not loc.exists():
            shutil.copytree(result["cache"], loc)
        for kind, position in zip(kinds, shards, strict=True):
            f = loc / "shards" / shard_file(loc, position)
            data = bytearray(f.read_bytes())
            if kind == "truncated":
                data = data[: len(data) // 2]
            elif kind == "empty":
                data = bytearray()
            elif kind == "altered":  # same size, different values: only the checksum tells
                data[len(data) // 3 : len(data) // 3 + 512] = b"\xff" * 512
            f.write_bytes(bytes(data))
        return loc

    return damage


@pytest.mark.parametrize("kind", ["truncated", "altered"])
def test_train_on_a_bad_shard_fails_before_ray_train_and_names_it(damaged, tmp_path, kind):
    loc = damaged(kind)
    work = tmp_path / "work"
    t0 = time.perf_counter()
    r = invoke("train", "-c", TINY, "--set", f"workdir={work}", "--set", f"train.cache={loc}")
    took = time.perf_counter() - t0
    assert r.exit_code == 2, r.output[-3000:]
    err = last_json(r.stdout)["error"]
    assert f"{loc}/shards/{shard_file(loc, SHARD)}" in err and f"insight cache verify {loc}" in err
    assert ("truncated" if kind == "truncated" else "checksum mismatch") in err
    assert "Traceback" not in r.output
    # Nothing started: no Ray Train run folder, no checkpoint, no MLflow run.
    assert not (work / "ray").exists() and not (work / "runs").exists() and not list(work.glob("mlflow*"))
    assert took < 30


def test_a_shard_that_goes_bad_after_the_check_is_named_from_inside_ray(damaged, tiny_cache, ray_local):
    """cache.verify=size lets an altered shard through the check: the Ray Data read that hits it
    fails with the shard's name, and the CLI reports it (exit 2) instead of Ray's wrapper."""
    from insight.cache import CacheReader, ShardError, cache_error_in

    cfg, _ = tiny_cache
    loc = damaged("altered")
    reader = CacheReader(str(loc))
    reader.check(checksums=False)  # sizes agree
    with pytest.raises(Exception) as info:
        reader.to_ray_dataset("train", cfg.cache.val_fraction).materialize()
    assert not isinstance(info.value, ShardError)  # Ray's wrapper ...
    found = cache_error_in(info.value)  # ... carries the shard-naming error
    name = shard_file(loc, SHARD)
    assert isinstance(found, ShardError) and found.shard == name and found.problem.endswith("checksum mismatch")
    assert found.location == str(loc)
    # A plain Ray task (concepts mines shards in tasks): the error crosses intact.
    bad = next(s for s in reader.manifest.shards if s.name == name)
    with pytest.raises(Exception) as info:
        ray_local.get(ray_local.remote(lambda: reader.read_shard(bad)).remote())
    found = cache_error_in(info.value)
    assert isinstance(found, ShardError) and found.shard == name and str(loc) in str(found)


def test_verify_names_every_bad_shard_and_exits_cleanly_every_time(damaged, tiny_cache):
    """`insight cache verify` exits 2 after naming the bad shards, never SIGABRT (134): decoding a
    shard used to leave its buffer to Arrow's thread pool, which could free it during interpreter exit."""
    _, result = tiny_cache
    ok = run_cli("cache", "verify", result["cache"])
    assert ok.returncode == 0 and last_json(ok.stdout)["verified"] is True
    loc = damaged("empty", "altered", shards=(3, 5))
    third, fifth = shard_file(loc, 3), shard_file(loc, 5)
    assert third.startswith("shard-00003-") and fifth.startswith("shard-00005-")  # named by position and content
    procs = [subprocess.Popen([sys.executable, "-m", "insight.cli", "cache", "verify", str(loc)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]
        assert "terminate called" not in err and "Traceback" not in err
        msg = last_json(out)["error"]
        assert "2 of 7 shards" in msg and f"{third} is corrupt" in msg
        assert f"{fifth} is corrupt: checksum mismatch" in msg


def test_decoding_a_shard_leaves_nothing_to_arrows_threads(tiny_cache):
    """The cause of the exit-134 above, checked directly: once decode_shard returns, no Arrow thread
    still holds the shard's bytes (pq.read_table's dataset scan released them later, on a pool thread)."""
    from insight.cache import CacheReader
    from insight.cache.format import decode_shard, read_bytes

    _, result = tiny_cache
    reader = CacheReader(result["cache"])
    m = reader.manifest
    for info in m.shards[:3]:
        data = read_bytes(reader.fs, reader.shard_path(info))
        before = sys.getrefcount(data)
        ids, _, feats = decode_shard(data, m.grid, m.dim, info.name)
        assert sys.getrefcount(data) == before and len(ids) == info.images
        del feats


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another driver that holds the folder's lock until it is killed."""
    code = ("import sys, time\nfrom insight.cache.format import resolve_fs\nfrom insight.cache.lock import "
            "ExtractionLock\nfs, path = resolve_fs(sys.argv[1])\nlock = ExtractionLock(fs, path).acquire()\n"
            "print(lock.token, flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return p


def test_lock_refuses_a_live_driver_and_takes_over_from_a_killed_one(tmp_path):
    from insight.cache.format import CacheError, atomic_write, resolve_fs
    from insight.cache.lock import ExtractionLock, LockLost, make_guard

    folder = tmp_path / "cache" / "key"
    holder = _hold_lock(folder)
    try:
        old_token = holder.stdout.readline().strip()
        assert old_token
        fs, path = resolve_fs(str(folder))
        with pytest.raises(CacheError, match=f"pid {holder.pid} on"):
            ExtractionLock(fs, path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with ExtractionLock(fs, path) as lock:  # its driver is gone: taken over at once
        assert lock.token != old_token
        # A worker of the killed run finishing a shard now: its write is dropped, nothing is left behind.
        with pytest.raises(LockLost, match="shard-00000.parquet is dropped"):
            atomic_write(fs, f"{path}/shards/shard-00000.parquet", b"late",
                         guard=make_guard(fs, path, old_token, "shard shard-00000.parquet"))
        atomic_write(fs, f"{path}/shards/shard-00001.parquet", b"ours", guard=lock.guard("shard 1"))
        assert sorted(p.name for p in (folder / "shards").iterdir()) == ["shard-00001.parquet"]
    assert not (folder / ".lock").exists()


def test_rerun_after_a_killed_extraction_completes_without_racing_its_leftovers(tmp_path, tiny_cache):
    """Kill `insight extract` mid-way (its Ray workers live on for seconds and finish shards), rerun
    at once: the cache completes with every image once and verifies clean, also after the leftovers
    are done (they find the rerun's lock token and drop their files)."""
    from insight.cache import CacheReader

    sets = ["--set", f"workdir={tmp_path}", "--set", "cache.shard_images=2", "--set", "extract.batch_size=1"]
    first = subprocess.Popen([sys.executable, "-m", "insight.cli", "extract", "-c", str(TINY), *sets, "--no-track"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("cache/*/shards/shard-*.json")):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # the driver only: its Ray workers are left to themselves
        first.wait(timeout=30)
        assert not list(tmp_path.glob("cache/*/manifest.json")), "the extraction finished before it was killed"
        second = invoke("extract", "-c", TINY, *sets, "--no-track")  # at once, in this process's Ray
        assert second.exit_code == 0, second.output[-3000:]
        out = last_json(second.stdout)
        assert 0 < out["new_shards"] < out["shards"] == 50  # the killed run's finished shards were kept
        loc = Path(out["cache"])
        manifest_time = (loc / "manifest.json").stat().st_mtime_ns
        time.sleep(3)  # leftovers that were mid-shard reach their rename (and drop it)
        ids = [i for i, _ in CacheReader(str(loc)).iter_images()]
        assert len(ids) == len(set(ids)) == 100
        assert set(ids) == {i for i, _ in CacheReader(tiny_cache[1]["cache"]).iter_images()}
        verify = invoke("cache", "verify", loc)
        assert verify.exit_code == 0, verify.output[-2000:]
        shards = list((loc / "shards").iterdir())
        assert all(p.stat().st_mtime_ns <= manifest_time for p in shards)  # nothing written after completion
        assert not [p.name for p in shards if p.name.startswith(".tmp-")] and not (loc / ".lock").exists()
    finally:
        try:  # what is left of the killed run's Ray (its agents share its session)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
