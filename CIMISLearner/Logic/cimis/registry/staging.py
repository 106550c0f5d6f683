"""Staging folders: where a version is written before it appears, named after their writer so that a sweep
removes only those whose writer is gone (host-aware: a registry on a network folder is shared by machines)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from pathlib import Path

_STALE_STAGING_S = 24 * 3600


def _machine_tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]


def _this_host() -> str:
    return _machine_tag(socket.gethostname())


def _this_boot() -> str:
    """This machine's boot (Linux: its boot id); "0" where unknown."""
    try:
        return _machine_tag(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        return "0"


def staging_name(pid: int, host: str | None = None, boot: str | None = None) -> str:
    """``PID-RANDOM-HOST-BOOT``: who writes a staging folder, so that a sweep on a registry shared by several
    machines (a network folder) judges only its own machine's writers (host and boot are hashes)."""
    return f"{pid}-{uuid.uuid4().hex[:12]}-{host or _this_host()}-{boot or _this_boot()}"


def _newest_mtime(item: Path) -> float:
    times = [item.stat().st_mtime]
    if item.is_dir():
        times += [child.stat().st_mtime for child in item.iterdir()]
    return max(times)


def is_stale(item: Path) -> bool:
    """Whether a staging entry's writer is gone: a process of this machine and boot that no longer runs,
    a process of an earlier boot of this machine, or anything untouched for a day. Another machine's
    entries (and entries of unknown origin) are left alone until then: their processes cannot be seen."""
    try:
        if time.time() - _newest_mtime(item) > _STALE_STAGING_S:
            return True
    except OSError:
        return True  # vanished or unreadable: nothing of a live writer
    parts = item.name.split("-")
    if len(parts) != 4 or not parts[0].isdigit() or parts[2] != _this_host():
        return False
    if parts[3] != _this_boot():
        return True  # written before this machine last booted
    pid = int(parts[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False
