"""Writes that survive a crash: files fsynced before they count, JSON replaced atomically, renames flushed to
disk, and removal of the read-only trees versions are."""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path

from cimis.fsync import fsync_dir


def copy_synced(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def write_synced(path: Path, data: dict) -> None:
    with open(path, "x", encoding="utf-8") as out:
        out.write(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2, allow_nan=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only version files and folders."""

    def make_writable(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
            func(target)
        except OSError:
            pass

    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        path.chmod(stat.S_IRWXU)
        shutil.rmtree(path, onerror=make_writable)
    else:
        path.unlink()
