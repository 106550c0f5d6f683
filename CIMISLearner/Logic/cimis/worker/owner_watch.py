"""The processes whose end orphans a job: the client named in ``CIMIS_OWNER_PID`` and the worker's parent.
Standard library only (Slicer's Python has no psutil)."""

from __future__ import annotations

import os

OWNER_PID_ENV = "CIMIS_OWNER_PID"  # set by a client (Slicer): the job cancels itself when that process is gone


class OwnerWatch:
    """The processes whose end orphans the job: the client named in ``CIMIS_OWNER_PID`` and the worker's own
    parent when it started (PythonSlicer's launcher, or the client itself)."""

    def __init__(self, owner_pid: int, parent_pid: int):
        self.owner_pid, self.parent_pid = owner_pid, parent_pid

    @classmethod
    def from_environment(cls) -> "OwnerWatch | None":
        text = os.environ.get(OWNER_PID_ENV, "").strip()
        if not text.isdigit():
            return None  # a batch run from a shell: no owner to outlive
        return cls(int(text), os.getppid())

    def gone(self) -> str | None:
        """Which process is gone, or None."""
        if os.name != "nt" and os.getppid() != self.parent_pid:  # reparented: the parent has ended
            return "parent process gone"
        if not process_alive(self.parent_pid):
            return "parent process gone"
        if not process_alive(self.owner_pid):
            return "owner process gone"
        return None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie, ended but not yet reaped, is not). Standard library only:
    Slicer's Python has no psutil."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): signal 0 is all there is
