"""The ``cimis worker`` subprocess, started and read without ever blocking Slicer's main thread.

The widget calls :meth:`WorkerProcess.poll` from a timer. A reader thread turns the worker's stdout (one JSON
event per line, docs/worker-protocol.md) into a queue; ``poll`` drains it and keeps a :class:`JobStatus`:
stage, iteration, ETA and loss while it runs, then ``done``, ``error`` or ``cancelled``. The thread never
touches the scene; only ``poll``, in the caller's thread, does anything with the events.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cimis.errors import CimisError

LOGIC_DIR = Path(__file__).resolve().parent.parent  # holds cimis and cimis_slicer
STDERR_FILE = "worker-stderr.log"
RUNNING, DONE, ERROR, CANCELLED = "running", "done", "error", "cancelled"
OWNER_PID_ENV = "CIMIS_OWNER_PID"  # the worker cancels itself when this process (Slicer) is gone
CANCEL_KILL_AFTER_S = 10.0  # a cancelled worker still running after this is ended with its process tree
SHUTDOWN_WAIT_S = 5.0  # Slicer closing: how long the worker gets to honour the cancel file


def worker_python() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` inside Slicer (it sets up Slicer's library
    paths), else this interpreter."""
    here = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (here / name).is_file():
            return str(here / name)
    return shutil.which("PythonSlicer") or sys.executable


def worker_command(job_file: Path, python: str | None = None, resume: bool = False) -> list[str]:
    return [python or worker_python(), "-m", "cimis.cli", "worker", str(job_file)] + (["--resume"] if resume else [])


def detached_process_options() -> dict:
    """``subprocess.Popen`` options that make the worker's process tree ours to end, with no console window.

    PythonSlicer is a launcher whose child is the real Python, so killing the launcher alone would leave the
    worker running. On POSIX the worker gets its own session (process group): :func:`end_process_tree` ends
    the group. On Windows the console window is hidden (as ``slicer.util.launchConsoleProcess`` does; closing
    that window would kill the job) and ``taskkill /T`` ends the tree.
    """
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return {"startupinfo": info,
                "creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def end_process_tree(process: subprocess.Popen) -> None:
    """End ``process`` and every process it started (the real Python behind a launcher)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, **detached_process_options())
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group leader's pid is the group id
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        try:
            process.kill()
        except OSError:
            pass


@dataclass
class JobStatus:
    """What the panel shows about a job; updated by :meth:`WorkerProcess.poll`."""

    state: str = RUNNING
    stage: str = "starting"
    iteration: int | None = None
    total: int | None = None
    eta_s: float | None = None
    loss: float | None = None
    device: str | None = None
    message: str = ""  # the error's or cancellation's sentence, or the latest warning
    result: dict = field(default_factory=dict)  # the done event

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def describe(self) -> str:
        """One line for the status label."""
        if self.state == DONE:
            return "done"
        if self.state in (ERROR, CANCELLED):
            return self.message
        text = self.stage
        if self.iteration is not None and self.total:
            text += f" {self.iteration}/{self.total}"
        if self.loss is not None:
            text += f", loss {self.loss:.3f}"
        if self.eta_s is not None:
            text += f", about {format_duration(self.eta_s)} left"
        if self.device:
            text += f" ({self.device})"
        return text


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class WorkerProcess:
    """One running ``cimis worker JOB.json``.

    Args:
        job_file: the job file (its ``output`` folder receives the cancel file).
        cancel_file: the file whose appearance cancels the job.
        log_dir: where the worker's stderr (human-readable logs, tracebacks of bugs) is written.
        python: the interpreter to run (default :func:`worker_python`).
        env: extra environment variables (tests pin thread counts with them).
        resume: continue the job from its output folder (``cimis worker --resume``).
    """

    def __init__(self, job_file: Path, cancel_file: Path, log_dir: Path, python: str | None = None,
                 env: dict | None = None, resume: bool = False):
        self.job_file = Path(job_file)
        self.cancel_file = Path(cancel_file)
        self.stderr_path = Path(log_dir) / STDERR_FILE
        self.status = JobStatus()
        self.events: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(LOGIC_DIR)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
        environment["PYTHONUNBUFFERED"] = "1"
        environment[OWNER_PID_ENV] = str(os.getpid())
        environment.update(env or {})
        self.cancel_requested_at: float | None = None
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.stderr_path, "ab" if resume else "wb")
        try:
            self.process = subprocess.Popen(worker_command(self.job_file, python, resume), stdout=subprocess.PIPE,
                                            stderr=self._stderr, stdin=subprocess.DEVNULL, env=environment,
                                            cwd=str(self.job_file.parent), **detached_process_options())
        except OSError as exc:
            self._stderr.close()
            raise CimisError(f"could not start the worker ({exc.strerror or exc})",
                             "check that CIMISLearner's Python dependencies are installed") from None
        self._reader = threading.Thread(target=self._read, name="cimis-worker-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # the protocol promises JSON lines; anything else is not ours to interpret
            if isinstance(event, dict):
                self._queue.put(event)
        self._queue.put(None)  # end of stream

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never waits); updates :attr:`status`. A worker that
        ignores a cancel for :data:`CANCEL_KILL_AFTER_S` is ended with its process tree."""
        if (self.cancel_requested_at is not None and not self.status.finished
                and time.monotonic() - self.cancel_requested_at > CANCEL_KILL_AFTER_S):
            end_process_tree(self.process)
        new = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                self._stream_ended()
                break
            new.append(event)
            self._apply(event)
        self.events.extend(new)
        return new

    def _apply(self, event: dict) -> None:
        status, kind = self.status, event.get("event")
        if kind == "stage":
            status.stage = event.get("stage", status.stage)
            status.iteration = None
            status.total = event.get("iterations", None)
        elif kind == "device":
            status.device = event.get("device")
        elif kind == "progress":
            status.iteration, status.total = event.get("iteration"), event.get("total")
            status.eta_s, status.device = event.get("eta_s"), event.get("device", status.device)
            if event.get("loss") is not None:
                status.loss = event["loss"]
        elif kind == "warning":
            status.message = event.get("message", "")
        elif kind == "done":
            status.state, status.result, status.message = DONE, event, ""
        elif kind == "error":
            hint = event.get("hint")
            status.state = ERROR
            status.message = event.get("message", "the worker failed") + (f" ({hint})" if hint else "")
        elif kind == "cancelled":
            status.state, status.message = CANCELLED, "cancelled"

    def _stream_ended(self) -> None:
        """The worker closed stdout. Without a final event it was killed or crashed: say so, with its last
        log line, rather than wait forever."""
        try:
            code = self.process.wait(timeout=10)  # stdout is closed, so the process is ending
        except subprocess.TimeoutExpired:
            end_process_tree(self.process)
            code = self.process.wait()
        self._end_leftovers()
        self._stderr.close()
        if self.status.state == RUNNING:
            self.status.state = ERROR
            self.status.message = (f"the worker stopped unexpectedly (exit status {code}): "
                                   f"{self.last_log_line() or 'no message'}")

    def last_log_line(self) -> str:
        try:
            lines = [l for l in self.stderr_path.read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def cancel(self) -> None:
        """Ask the worker to stop through its cancel file (every platform); it ends within seconds, and
        :meth:`poll` ends its process tree if it has not after :data:`CANCEL_KILL_AFTER_S`."""
        if self.status.finished:
            return
        self.cancel_file.parent.mkdir(parents=True, exist_ok=True)
        self.cancel_file.touch()
        if self.cancel_requested_at is None:
            self.cancel_requested_at = time.monotonic()

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Slicer is closing: the cancel file first (the worker stops cleanly and never publishes), then,
        after ``wait_s`` at most, the whole process tree. Returns when the worker is gone."""
        if self.process.poll() is None:
            self.cancel()
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """End the worker and every process it started, now. The registry survives this by design."""
        end_process_tree(self.process)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._end_leftovers()
        self._stderr.close()  # our handle on its log: Windows cannot remove the job folder while it is open

    def _end_leftovers(self) -> None:
        """The launcher has exited; a child it left behind (same process group) is ended too."""
        if os.name != "nt":
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
