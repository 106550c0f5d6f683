"""Cancelling a job: SIGINT, SIGTERM, the cancel file and a gone owner raise :class:`JobCancelled` in the main
thread; a watcher thread ends the process if the main thread is stuck in native code."""

from __future__ import annotations

import _thread
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

from cimis.worker.events import EXIT_SIGINT, EXIT_SIGTERM, EventStream
from cimis.worker.owner_watch import OwnerWatch

CANCEL_GRACE_S = 3.0  # after a cancel request, the watcher ends a main thread stuck in native code
CANCEL_POLL_S = 0.2


class JobCancelled(BaseException):
    """Raised in the main thread when the job is cancelled. A BaseException, so that library code catching
    ``Exception`` cannot swallow it."""

    def __init__(self, reason: str):
        super().__init__(f"cancelled by {reason}")
        self.reason = reason


def exit_code_for(reason: str) -> int:
    return EXIT_SIGINT if reason == "SIGINT" else EXIT_SIGTERM


_SIGNAL_REASONS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Cancellation:
    """SIGINT, SIGTERM and a cancel file -> :class:`JobCancelled` in the main thread, within seconds.

    Python runs signal handlers only between bytecodes of the main thread, so a long native call (a big
    convolution, a volume being resampled) would delay them. The C-level handler also writes the signal
    number to a wakeup pipe, which a watcher thread reads at once; if the main thread has not finished
    :data:`CANCEL_GRACE_S` seconds after a request, the watcher reports ``cancelled`` and ends the process
    (as safe as ``kill -9``, which the registry is built to survive). The watcher also polls the cancel file.

    :meth:`commit` marks the point of no return (the new version is about to appear in the registry): a
    request before it cancels the job, one after it is ignored and the job completes.
    """

    def __init__(self, events: EventStream, grace_s: float = CANCEL_GRACE_S, poll_s: float = CANCEL_POLL_S):
        self.events = events
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.cancel_file: Path | None = None
        self._cancel_file_preexisting = False
        self.reason: str | None = None
        self.requested_at: float | None = None
        self.committed = False
        self.reporting = False  # set while the job's end is being reported: nothing may interrupt that
        # Re-entrant: the signal handler runs in the main thread and may interrupt it inside commit().
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_handlers: dict = {}
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        self.owns_process = False  # only a job run in the main thread may interrupt it or end the process
        self.owners = OwnerWatch.from_environment()

    # ------------------------------------------------------------------------------- lifecycle
    def install(self) -> None:
        """Install the handlers and start the watcher. Signals can only be handled in the main thread;
        elsewhere (a job run from a thread of another program) only the cancel file works."""
        self.owns_process = threading.current_thread() is threading.main_thread()
        self.events.after_write = self.check
        if not self.owns_process:
            self._thread = threading.Thread(target=self._watch, name="cimis-cancel-watcher", daemon=True)
            self._thread.start()
            return
        for sig in _SIGNAL_REASONS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if os.name == "posix":  # set_wakeup_fd needs a socket on Windows, where SIGTERM does not exist anyway
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w)
            self._old_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="cimis-cancel-watcher", daemon=True)
        self._thread.start()

    def uninstall(self) -> None:
        self._stop.set()
        self.events.after_write = None
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def watch_file(self, path: Path | None) -> None:
        self.cancel_file = path
        # A file that was there before the job is a request only if it is empty (jobs.py refuses any other);
        # the worker deletes the cancel file it obeyed, never a file that holds something of someone's.
        self._cancel_file_preexisting = path is not None and (path.exists() or path.is_symlink())

    # ----------------------------------------------------------------------------------- requests
    def request(self, reason: str) -> bool:
        """Record a cancel request; True if it is the first."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.requested_at = reason, time.monotonic()
            return True

    def check(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was requested and the job has not committed."""
        if self.reason is not None and not self.committed and not self.reporting and self.events.terminal is None:
            raise JobCancelled(self.reason)

    def commit(self) -> None:
        """The point of no return: raise if cancelled already, else ignore every later request."""
        with self._lock:
            if self.reason is not None:
                raise JobCancelled(self.reason)
            self.committed = True

    def _on_signal(self, signum, frame) -> None:
        self.request(_SIGNAL_REASONS.get(signum, "SIGTERM"))
        if self.events.writing:
            return  # never cut an event line in half; the stream raises once the line is out
        self.check()

    def remove_cancel_file(self) -> None:
        if self.cancel_file is None:
            return
        try:
            if self.cancel_file.is_symlink() or not self.cancel_file.is_file():
                return
            if self._cancel_file_preexisting and self.cancel_file.stat().st_size > 0:
                return
            self.cancel_file.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------------------------ watcher
    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._wakeup is not None:
                try:
                    ready, _, _ = select.select([self._wakeup[0]], [], [], self.poll_s)
                    if ready:
                        for signum in os.read(self._wakeup[0], 64):
                            if signum in _SIGNAL_REASONS:
                                self.request(_SIGNAL_REASONS[signum])
                except (OSError, ValueError):
                    self._stop.wait(self.poll_s)
            else:
                self._stop.wait(self.poll_s)
            if self._stop.is_set():
                return
            if self.reason is None and self.cancel_file is not None and self.cancel_file.exists():
                if self.request("cancel file") and self.owns_process:
                    _interrupt_main()
            orphaned = self.owners.gone() if self.reason is None and self.owners is not None else None
            if orphaned is not None and self.request(orphaned) and self.owns_process:
                _interrupt_main()
            if self.owns_process and self.reason is not None and time.monotonic() - self.requested_at > self.grace_s:
                self._force_exit()

    def _force_exit(self) -> None:
        with self._lock:  # held until exit, so the main thread cannot commit in between
            if self.committed or self.events.terminal is not None or self._stop.is_set():
                return
            code = exit_code_for(self.reason)
            self.events.emit("cancelled", reason=self.reason, exit_code=code, forced=True,
                             message="the job was cancelled; the model registry is unchanged")
            self.remove_cancel_file()
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)


def _interrupt_main() -> None:
    """Run the SIGTERM handler in the main thread (as if the signal had arrived)."""
    try:
        _thread.interrupt_main(signal.SIGTERM)
    except TypeError:  # Python < 3.10: SIGINT only
        _thread.interrupt_main()
