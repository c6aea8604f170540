"""Atomic local writes of files and folders: readers never see half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to a temp file beside ``path`` and rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def swap_in_folder(stage: str | os.PathLike, out: str | os.PathLike) -> None:
    """Replace the folder ``out`` by the finished folder ``stage`` (same file system): the old one
    is moved aside, the new one renamed into place, then the old one removed."""
    stage, out = Path(stage), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
