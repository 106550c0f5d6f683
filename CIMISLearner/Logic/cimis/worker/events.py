"""The worker's event stream (docs/worker-protocol.md): one JSON object per stdout line, each with ``event``,
``protocol``, ``time``, ``seq`` and ``job``; the stream ends with exactly one terminal event. The exit codes
that go with the terminal events are here too."""

from __future__ import annotations

import datetime
import json
import math
import threading
from pathlib import Path
from typing import Any, Callable, TextIO

PROTOCOL = 1
EXIT_DONE, EXIT_BUG, EXIT_USER_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class EventStream:
    """Writes protocol events, one JSON object per line, thread-safely; remembers the terminal event."""

    TERMINAL = ("done", "error", "cancelled")

    def __init__(self, out: TextIO):
        self.out = out
        self.job_id: str | None = None
        self.terminal: str | None = None
        self.writing = False  # a cancel arriving now waits for the line to be complete
        self.after_write: Callable[[], None] | None = None  # runs in the main thread after each line
        self._seq = 0
        self._lock = threading.Lock()

    def emit(self, event: str, **payload: Any) -> None:
        if not self._lock.acquire(timeout=1.0):  # never let a stuck writer block a forced exit
            return
        try:
            if self.terminal is not None:
                return  # the stream has ended; a late event would confuse the reader
            if event in self.TERMINAL:
                self.terminal = event
            self._seq += 1
            record = {"event": event, "protocol": PROTOCOL, "time": utc_timestamp(), "seq": self._seq, "job": self.job_id}
            record.update(payload)
            line = json.dumps(jsonable(record), allow_nan=False) + "\n"
            self.writing = True
            try:
                self.out.write(line)
                self.out.flush()
            finally:
                self.writing = False
        except (OSError, ValueError):
            pass  # the reader went away: the job still finishes and leaves its result on disk
        finally:
            self._lock.release()
        # A cancel that arrived while the line was written is raised now, at a line boundary.
        if self.after_write is not None and self.terminal is None and threading.current_thread() is threading.main_thread():
            self.after_write()


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def jsonable(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, paths and numpy scalars their str/number."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return jsonable(value.item())
        except (ValueError, TypeError):
            pass
    return str(value)
