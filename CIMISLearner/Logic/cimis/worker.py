"""``cimis worker JOB.json``: run one job in its own process and report it as JSON lines on stdout.

The protocol (docs/worker-protocol.md) is versioned (:data:`PROTOCOL`): every stdout line is one JSON object
with ``event``, ``protocol``, ``time``, ``seq`` and ``job``; nothing else is written to stdout (the worker
moves file descriptor 1 to stderr and keeps a private copy for events). A stream starts with ``started`` and
ends with exactly one of ``done`` (exit 0), ``error`` (exit 2 for a problem the user can fix, 1 for a bug)
or ``cancelled`` (exit 130 after SIGINT, 143 after SIGTERM or the cancel file).

Safety rules the code below keeps:

* Inputs are checked before anything is written (:mod:`cimis.jobs`, :func:`cimis.registry.verify_model_folder`);
  these checks import neither torch nor MONAI, so a bad job fails within a second.
* A job writes only into its output folder (checkpoints, label maps, ``result.json``, its temp files) and, at
  the very end, into the registry through :meth:`Registry.publish`, whose rename is the only step that makes
  a new version visible. Cancellation is honoured up to that rename and ignored after it.
* ``kill -9`` at any moment leaves the registry as it was (or with the new version complete); ``--resume``
  continues from the last checkpoint, and never publishes a version twice (the job's token is in the
  version's summary).
* Cancel: SIGTERM, SIGINT and the cancel file raise :class:`JobCancelled` in the main thread; a watcher
  thread ends the process itself if the main thread is stuck in native code for :data:`CANCEL_GRACE_S`.
  A worker started by a client that names itself in ``CIMIS_OWNER_PID`` also cancels itself when that
  process or its own parent (a launcher such as PythonSlicer) is gone: nobody is left to ask before a
  version is published.
* CUDA out of memory: :func:`next_attempt_after_oom` says what to try next (smaller batch, smaller patch,
  then the CPU) and :func:`run_with_oom_retries` retries, reporting each change as an ``oom`` event.
"""

from __future__ import annotations

import _thread
import datetime
import json
import math
import os
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, TypeVar

from cimis import __version__
from cimis.errors import CimisError, user_error_in
from cimis.jobs import Job, check_segment_inputs, check_training_data, load_job, resolve_new_classes
from cimis.registry import Registry, classes_of, read_json_file, verify_model_folder

PROTOCOL = 1
EXIT_DONE, EXIT_BUG, EXIT_USER_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
CANCEL_GRACE_S = 3.0  # after a cancel request, the watcher ends a main thread stuck in native code
CANCEL_POLL_S = 0.2
PAUSE_ENV = "CIMIS_WORKER_PAUSE_AT"  # fault-injection tests: "POINT[,POINT]" pauses there (docs/worker-protocol.md)
PAUSE_SECONDS = 120.0
OWNER_PID_ENV = "CIMIS_OWNER_PID"  # set by a client (Slicer): the job cancels itself when that process is gone
STATE_FORMAT = "cimis-job-state/1"

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- events
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
            record = {"event": event, "protocol": PROTOCOL, "time": _now(), "seq": self._seq, "job": self.job_id}
            record.update(payload)
            line = json.dumps(_jsonable(record), allow_nan=False) + "\n"
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, paths and numpy scalars their str/number."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return _jsonable(value.item())
        except (ValueError, TypeError):
            pass
    return str(value)


# ------------------------------------------------------------------------------------ cancellation
class JobCancelled(BaseException):
    """Raised in the main thread when the job is cancelled. A BaseException, so that library code catching
    ``Exception`` cannot swallow it."""

    def __init__(self, reason: str):
        super().__init__(f"cancelled by {reason}")
        self.reason = reason


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


# ---------------------------------------------------------------------------------- out of memory
@dataclass(frozen=True)
class Attempt:
    """What one try of a GPU step uses: the device, the batch (training patches or sliding windows) and
    the patch size."""

    device: str
    batch_size: int
    patch_size: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "patch_size": list(self.patch_size)}


def next_attempt_after_oom(failed: Attempt, first: Attempt, patch_divisor: Sequence[int] | None) -> Attempt | None:
    """What to try after CUDA ran out of memory with ``failed`` (``first`` was the job's own setting).

    Halve the batch down to 1; then, when ``patch_divisor`` is given (the patch may change), halve the
    patch's largest axis while it stays a multiple of the divisor and at least half the original; then the
    CPU with the original batch and patch. None once the CPU has failed too (not a GPU problem).
    """
    if not failed.device.startswith("cuda"):
        return None
    if failed.batch_size > 1:
        return replace(failed, batch_size=max(1, failed.batch_size // 2))
    if patch_divisor is not None:
        order = sorted(range(3), key=lambda a: -failed.patch_size[a])
        for axis in order:
            size, step = failed.patch_size[axis], int(patch_divisor[axis])
            smaller = (size // 2) // step * step
            if smaller >= step and smaller * 2 >= first.patch_size[axis]:
                patch = list(failed.patch_size)
                patch[axis] = smaller
                return replace(failed, patch_size=tuple(patch))
    return replace(first, device="cpu")


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is CUDA running out of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        text = str(exc)
        if name == "OutOfMemoryError" or ("CUDA" in text and "out of memory" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_cpu_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text or "not enough memory" in text


def run_with_oom_retries(
    step: Callable[[Attempt], T],
    first: Attempt,
    patch_divisor: Sequence[int] | None,
    on_retry: Callable[[Attempt, Attempt, BaseException], None],
    free_memory: Callable[[], None] | None = None,
) -> T:
    """``step(attempt)``, retried after CUDA out-of-memory errors as :func:`next_attempt_after_oom` says.

    ``on_retry(failed, next, error)`` reports each change; ``free_memory`` runs before a retry.
    """
    attempt = first
    while True:
        try:
            return step(attempt)
        except BaseException as exc:
            if isinstance(exc, JobCancelled) or not is_cuda_oom(exc):
                if _is_cpu_oom(exc):
                    raise CimisError("the computer ran out of memory (RAM) for this job",
                                     "close other programs, or use a smaller batch size or patch size") from exc
                raise
            following = next_attempt_after_oom(attempt, first, patch_divisor)
            if following is None:
                raise
            on_retry(attempt, following, exc)
            del exc
            if free_memory is not None:
                free_memory()
            attempt = following


def _free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- fault points
def pause_point(point: str, events: EventStream) -> None:
    """For fault-injection tests: when ``CIMIS_WORKER_PAUSE_AT`` names ``point``, report it and wait, so
    a test can ``kill -9`` the worker exactly there. Does nothing otherwise."""
    wanted = os.environ.get(PAUSE_ENV, "")
    if point in {p.strip() for p in wanted.split(",") if p.strip()}:
        events.emit("paused", point=point)
        time.sleep(PAUSE_SECONDS)


# ------------------------------------------------------------------------------------ the output folder
class WorkFolder:
    """A job's output folder::

        job-state.json   the job, its token and the versions it started from (written when work begins)
        run/             checkpoints and the finished model before it is published (train, learn)
        labels/          label maps (segment)
        result.json      the done event's payload (written just before it)
        tmp/             temporary files of the job's libraries
        cancel           the default cancel file (written by the client)
    """

    def __init__(self, root: Path):
        self.root = root
        self.state_file = root / "job-state.json"
        self.result_file = root / "result.json"
        self.run = root / "run"
        self.labels = root / "labels"
        self.tmp = root / "tmp"

    def holds_a_job(self) -> bool:
        return any(p.exists() for p in (self.state_file, self.result_file, self.run, self.labels))

    def read_state(self) -> dict | None:
        if not self.state_file.exists():
            return None
        return read_json_file(self.state_file, "the job state", "start the job afresh in a new output folder")

    def read_result(self) -> dict | None:
        if not self.result_file.exists():
            return None
        return read_json_file(self.result_file, "the job result")

    TMP_MARKER = ".cimis-job-tmp"  # inside tmp/: the job made this folder and may delete it

    def create(self, state: dict) -> None:
        """Create the folder (the job's first write) and send the libraries' temporary and cache files into it."""
        if self.tmp.exists() and not (self.tmp / self.TMP_MARKER).is_file():
            raise CimisError(f"the output folder {self.root} has a tmp folder that is not the job's",
                             "move it away, or give the job a new output folder")
        self.created_root = not self.root.exists()
        self.created_state = not self.state_file.exists()
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            (self.tmp / self.TMP_MARKER).touch()
        except OSError as exc:
            raise CimisError(f"cannot create the output folder {self.root}: {exc.strerror or exc}",
                             "choose a writable output folder") from None
        _write_json(self.state_file, state)
        tempfile.tempdir = str(self.tmp)
        os.environ["TMPDIR"] = str(self.tmp)
        # matplotlib (imported by MONAI) writes a font cache on first import; keep it inside the job too.
        os.environ["MPLCONFIGDIR"] = str(self.tmp / "matplotlib")

    def roll_back(self) -> None:
        """Undo :meth:`create` when the job stops before any work (a bad setting found after the folder was
        made): a refused job leaves nothing behind."""
        import shutil

        if getattr(self, "created_root", False):
            shutil.rmtree(self.root, ignore_errors=True)
            return
        self.remove_tmp()
        if getattr(self, "created_state", False):
            self.state_file.unlink(missing_ok=True)

    def checkpoint_exists(self) -> bool:
        return (self.run / "checkpoint" / "state.json").is_file() or (self.run / "checkpoint.old" / "state.json").is_file()

    def finished_model(self) -> Path | None:
        """``run/model`` if a complete model is there (written by an earlier, killed run of this job)."""
        model = self.run / "model"
        if not model.is_dir():
            return None
        verify_model_folder(model, f"the finished model of this job ({model})")
        return model

    def clean_partial_saves(self) -> None:
        """Remove the temporary siblings a model or checkpoint save leaves when killed (``run/.model.*``)."""
        import shutil

        if self.run.is_dir():
            for item in self.run.iterdir():
                if item.name.startswith((".model.", ".checkpoint.")) and item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)

    def finish(self, result: dict) -> None:
        import shutil

        _write_json(self.result_file, result)
        shutil.rmtree(self.run, ignore_errors=True)  # published: the registry holds the model now
        self.remove_tmp()

    def remove_tmp(self) -> None:
        """Delete tmp/ only if the job made it (a user's own tmp/ in a chosen output folder stays)."""
        import shutil

        if (self.tmp / self.TMP_MARKER).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ a run
class JobRun:
    """One execution of a job: the job, its event stream, its cancellation and its output folder."""

    def __init__(self, job: Job, events: EventStream, cancellation: Cancellation, resume: bool):
        self.job = job
        self.events = events
        self.cancellation = cancellation
        self.resume = resume
        self.work = WorkFolder(job.output)
        self.started = time.monotonic()
        self.device = "cpu"
        self.published: str | None = None
        self.can_roll_back = False

    # ------------------------------------------------------------------------------------ events
    def stage(self, name: str, **payload) -> None:
        self.events.emit("stage", stage=name, **payload)
        pause_point(f"stage:{name}", self.events)

    def warn(self, code: str, message: str) -> None:
        self.events.emit("warning", code=code, message=message)

    def trainer_event(self, kind: str, payload: dict) -> None:
        """The engine's on_event sink: progress, metric and checkpoint become protocol events."""
        self.cancellation.check()  # a job run outside the main thread learns of a cancel file here
        if kind == "progress":
            self.events.emit("progress", stage="training", **payload)
            if payload.get("iteration") == payload.get("total"):
                self.stage("saving")
        elif kind in ("metric", "checkpoint"):
            self.events.emit(kind, **payload)
            if kind == "checkpoint":
                pause_point("checkpoint", self.events)

    def publish_step(self, step: str) -> None:
        """The registry's publish hook: the commit point, and fault points for the tests."""
        pause_point(f"publish:{step}", self.events)
        if step == "staged":
            self.cancellation.commit()  # the rename into versions/ comes next: from here the job completes

    def oom_retry(self, failed: Attempt, following: Attempt, error: BaseException) -> None:
        if following.device == "cpu":
            action = "falling back to the CPU"
        elif following.batch_size < failed.batch_size:
            action = f"retrying with batch size {following.batch_size}"
        else:
            action = f"retrying with patch size {'x'.join(map(str, following.patch_size))}"
        self.events.emit("oom", message=f"the GPU ran out of memory; {action}", failed=failed.to_json(),
                         next=following.to_json())
        if following.device == "cpu":
            self.warn("cpu_fallback", "the GPU has too little free memory for this job: continuing on the CPU, "
                                      "which is much slower")
        self.device = following.device

    # ------------------------------------------------------------------------------------ helpers
    def resolve_device(self) -> str:
        """The device to use; no GPU means the CPU, with a warning event."""
        import torch

        if self.job.threads:
            cores = _cores_present()
            if self.job.threads > cores:  # torch would try to start them all, and fail only after a while
                self.warn("threads_capped", f"threads {self.job.threads} is more than the {cores} CPU cores "
                                            f"present: using {cores}")
            torch.set_num_threads(min(self.job.threads, cores))
        requested = self.job.device
        cuda = torch.cuda.is_available()
        if requested == "cpu":
            device = "cpu"
        elif cuda:
            device = "cuda:0" if requested in ("auto", "cuda") else requested
            index = int(device.split(":")[1])
            if index >= torch.cuda.device_count():
                raise CimisError(f"device {requested} does not exist ({torch.cuda.device_count()} GPUs)",
                                 "use cuda, cuda:0 or auto")
        else:
            device = "cpu"
            self.warn("no_gpu", "no CUDA GPU is available: running on the CPU, which is much slower")
        info: dict[str, Any] = {"device": device, "requested": requested, "cuda_available": cuda,
                                "threads": torch.get_num_threads()}
        if device.startswith("cuda"):
            props = torch.cuda.get_device_properties(int(device.split(":")[1]))
            info.update(gpu=props.name, gpu_memory_mb=props.total_memory / 2**20)
        self.events.emit("device", **info)
        self.device = device
        return device

    def prepare(self, state: dict) -> dict:
        """Create the output folder (the first write of the job); until :meth:`begin_work`, a failure
        removes it again."""
        self.work.create(state)
        self.can_roll_back = True
        return state

    def begin_work(self) -> None:
        """From here on the output folder holds the job's progress (checkpoints, label maps) and is kept."""
        self.can_roll_back = False

    def start_or_finished(self) -> tuple[dict, dict | None]:
        """The job state to run with, and the result when an earlier run of this job already finished."""
        state, resuming = self.start_state({})
        return state, (self.work.read_result() if resuming else None)

    def start_state(self, extra: dict) -> tuple[dict, bool]:
        """The job state to run with and whether it continues an earlier run (checked, nothing written)."""
        saved = self.work.read_state() if self.resume else None
        if not self.resume and self.work.holds_a_job():
            raise CimisError(f"the output folder {self.job.output} holds an earlier job",
                             "pass --resume to continue it, or give the job a new output folder")
        if saved is not None:
            recorded = saved.get("job", {})
            if saved.get("format") != STATE_FORMAT or recorded.get("kind") != self.job.kind or recorded.get("id") != self.job.id:
                raise CimisError(f"the output folder {self.job.output} holds another job ({recorded.get('kind')} "
                                 f"{recorded.get('id')!r})", "give the job a new output folder")
            return saved, True
        if self.resume:
            self.warn("nothing_to_resume", "this job has no saved progress yet: starting it from the beginning")
        return {"format": STATE_FORMAT, "job": self.job.to_json(), "token": uuid.uuid4().hex,
                "started": _now(), **extra}, False

    def publish(self, registry_root: Path, model_dir: Path, summary: dict, activate: bool, token: str) -> Registry:
        """Publish the finished model (once: a resumed job finds its own version by its token)."""
        self.stage("publishing")
        registry = Registry.open(registry_root, create=True)
        existing = registry.find_by_job_token(token)
        if existing is None:
            version = registry.publish(model_dir, summary, activate=activate, on_step=self.publish_step)
        else:
            self.cancellation.commit()
            version = existing
            if activate and registry.active_version() != existing:
                registry.activate(existing)
        self.published = version
        return registry

    def result(self, **payload) -> dict:
        return {"kind": self.job.kind, "seconds": time.monotonic() - self.started, **payload}


def _cores_present() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------- runners
def _check_registry_for_training(job: Job) -> Registry | None:
    """The job's registry if it exists; otherwise check that a train job may create it."""
    root = job.registry
    if (root / "registry.json").is_file():
        return Registry.open(root)
    if job.kind != "train":
        Registry.open(root)  # raises: learn and segment need a registry with a model
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CimisError(f"{root} exists and is not a model registry", "choose an empty or new folder for the registry")
    return None


def run_train(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    manifest = job.manifest
    classes = manifest.classes.subset(job.class_names) if job.class_names else manifest.classes
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    _check_registry_for_training(job)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    check_training_data(manifest, classes)
    state = run.prepare(state)

    from cimis.data.preprocess import PreprocessConfig
    from cimis.model.network import NetworkConfig
    from cimis.train import TrainConfig, train_model

    device = run.resolve_device()
    try:
        preprocess = PreprocessConfig.from_json(settings["preprocess"])
        network = settings["network"]
        net_config = (NetworkConfig.from_json(network) if isinstance(network, dict)
                      else NetworkConfig.preset(network, preprocess.patch_size, preprocess.spacing))
    except TypeError as exc:
        raise CimisError(f"job file {job.source}: malformed train.preprocess or train.network ({exc})") from None
    divisor = net_config.size_divisor
    if any(p % d for p, d in zip(preprocess.patch_size, divisor)):
        raise CimisError(f"patch size {preprocess.patch_size} is not a multiple of {divisor} per axis",
                         "choose a patch size divisible by the network's total stride")
    budget = job.budget
    iterations = budget.iterations or 1000
    config = TrainConfig(
        iterations=iterations, batch_size=budget.batch_size or 2, device=device,
        learning_rate=settings.get("learning_rate", 2e-3), seed=settings.get("seed", 0),
        augment=settings.get("augment", True), amp=settings.get("amp", True),
        val_every=budget.val_every or max(iterations // 4, 1),
        checkpoint_every=budget.checkpoint_every or max(iterations // 4, 1),
    )
    run.cancellation.check()
    run.begin_work()
    run.work.clean_partial_saves()

    model_dir = run.work.finished_model()
    if model_dir is None:
        run.stage("training", iterations=iterations)
        first = Attempt(device, config.batch_size, tuple(preprocess.patch_size))

        def train(attempt: Attempt) -> Path:
            return train_model(
                manifest, run.work.run, classes, net_config,
                replace(preprocess, patch_size=list(attempt.patch_size)),
                replace(config, device=attempt.device, batch_size=attempt.batch_size,
                        samples_per_volume=min(config.samples_per_volume, attempt.batch_size)),
                resume=run.work.checkpoint_exists(), on_event=run.trainer_event, progress=False,
            )

        model_dir = run_with_oom_retries(train, first, divisor, run.oom_retry, _free_cuda_memory)
    card = read_json_file(model_dir / "card.json", "the trained model's card")
    summary = {
        "kind": "train", "note": settings.get("note", ""), "base_version": None, "dataset": manifest.name,
        "new_classes": classes.names, "iterations": iterations, "device": run.device,
        "metrics": card.get("metrics", {}), "job": {**job.to_json(), "token": state["token"]},
    }
    registry = run.publish(job.registry, model_dir, summary, settings.get("activate", True), state["token"])
    result = run.result(version=run.published, active=registry.active_version() == run.published,
                        model=registry.versions_dir / run.published, classes=classes_of(card).names,
                        metrics=card.get("metrics", {}), registry=registry.root, outputs=[])
    run.work.finish(result)
    return result


def run_learn(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    manifest = job.manifest
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    registry = Registry.open(job.registry)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    base = state.get("base_version") or registry.resolve(settings["base_version"])
    state["base_version"] = base
    old_card = registry.verify(base)
    new = resolve_new_classes(job, classes_of(old_card, f"version {base}"))
    check_training_data(manifest, new)
    state = run.prepare(state)

    from cimis.incremental.base import StepOptions
    from cimis.incremental.learn import default_step_config, learn_step
    from cimis.incremental.strategies import STRATEGIES
    from cimis.model.modelfile import load_card

    strategy = settings["strategy"]
    if strategy not in STRATEGIES:
        raise CimisError(f"job file {job.source}: unknown strategy {strategy!r} in learn.strategy",
                         f"choose one of {', '.join(STRATEGIES)}")
    try:
        options = StepOptions.from_json(settings["options"])
    except CimisError as exc:
        raise CimisError(f"job file {job.source}: learn.options: {exc.message}", exc.hint) from None
    except TypeError as exc:
        raise CimisError(f"job file {job.source}: malformed learn.options ({exc})") from None
    device = run.resolve_device()
    base_dir = registry.versions_dir / base
    config = default_step_config(load_card(base_dir))
    budget = job.budget
    overrides = {k: v for k, v in {
        "iterations": budget.iterations, "batch_size": budget.batch_size,
        "learning_rate": settings.get("learning_rate"), "seed": settings.get("seed"),
        "augment": settings.get("augment"), "amp": settings.get("amp"),
    }.items() if v is not None}
    config = replace(config, device=device, **overrides)
    config = replace(config, val_every=budget.val_every or max(config.iterations // 4, 1),
                     checkpoint_every=budget.checkpoint_every or max(config.iterations // 4, 1))
    run.cancellation.check()
    run.begin_work()
    run.work.clean_partial_saves()

    model_dir = run.work.finished_model()
    first = Attempt(device, config.batch_size, tuple(load_card(base_dir).preprocessing.patch_size))
    if model_dir is None:
        run.stage("training", iterations=config.iterations, base_version=base, new_classes=new.names)

        def learn(attempt: Attempt) -> Path:
            # The patch size belongs to the model (its card), so only the batch and the device may change.
            return learn_step(
                base_dir, manifest, run.work.run, new.names, strategy,
                replace(config, device=attempt.device, batch_size=attempt.batch_size,
                        samples_per_volume=min(config.samples_per_volume, attempt.batch_size)),
                options, resume=run.work.checkpoint_exists(), on_event=run.trainer_event, progress=False,
            )

        model_dir = run_with_oom_retries(learn, first, None, run.oom_retry, _free_cuda_memory)
    check = _check_new_version(run, base_dir, model_dir, new, first)
    card = read_json_file(model_dir / "card.json", "the new model's card")
    summary = {
        "kind": "learn", "note": settings.get("note", ""), "base_version": base, "dataset": manifest.name,
        "strategy": strategy, "new_classes": new.names, "iterations": config.iterations, "device": run.device,
        "metrics": card.get("metrics", {}), "check": check, "job": {**job.to_json(), "token": state["token"]},
    }
    registry = run.publish(job.registry, model_dir, summary, settings.get("activate", True), state["token"])
    result = run.result(version=run.published, active=registry.active_version() == run.published,
                        base_version=base, model=registry.versions_dir / run.published,
                        classes=classes_of(card).names, new_classes=new.names, check=check,
                        metrics=card.get("metrics", {}), registry=registry.root, outputs=[])
    run.work.finish(result)
    return result


def _check_new_version(run: JobRun, base_dir: Path, model_dir: Path, new, first: Attempt) -> dict:
    """Score the new version before it is published (cimis.version_check): Dice of the new organs on the
    volumes marked for validation, old and new versions' agreement on every old organ."""
    from cimis.infer import segment_image
    from cimis.version_check import score_new_version

    manifest = run.job.manifest
    run.stage("scoring", volumes=len(manifest.cases_in("train") + manifest.cases_in("val")))
    attempt_box = {"attempt": replace(first, batch_size=2)}

    def segment(net, card, image):
        def one(attempt: Attempt):
            attempt_box["attempt"] = attempt
            return segment_image(net.to(attempt.device), card, image, device=attempt.device,
                                 sw_batch_size=attempt.batch_size).label

        import SimpleITK as sitk

        label = run_with_oom_retries(one, attempt_box["attempt"], None, run.oom_retry, _free_cuda_memory)
        return sitk.GetArrayFromImage(label)

    check = score_new_version(base_dir, model_dir, manifest, new, run.device, segment, run.cancellation.check)
    run.events.emit("check", **check)
    return check


def run_segment(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    registry = Registry.open(job.registry)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    version = state.get("version") or registry.resolve(settings["version"])
    state["version"] = version
    registry.verify(version)
    check_segment_inputs(job.images)
    targets = [run.work.labels / f"{item.id}.{settings['format']}" for item in job.images]
    state = run.prepare(state)

    from cimis.data.io import read_image, write_image
    from cimis.infer import segment_image
    from cimis.metrics import class_volumes_ml
    from cimis.train import peak_memory_mb

    import SimpleITK as sitk
    import torch

    device = run.resolve_device()
    net, card, _ = registry.load(version)
    run.cancellation.check()
    run.begin_work()
    run.stage("segmenting", version=version, images=len(job.images))
    divisor = card.network.size_divisor
    first = Attempt(device, 2, tuple(card.preprocessing.patch_size))
    attempt_box = {"attempt": first}
    outputs, started = [], time.monotonic()
    for index, (item, target) in enumerate(zip(job.images, targets)):
        if target.exists():  # written by an earlier, interrupted run of this job (writes are atomic)
            label = read_image(target)
            volumes = class_volumes_ml(sitk.GetArrayViewFromImage(label), label.GetSpacing()[::-1], card.classes)
        else:
            image = read_image(item.image)

            def segment(attempt: Attempt):
                attempt_box["attempt"] = attempt
                patched = replace(card, preprocessing=replace(card.preprocessing, patch_size=list(attempt.patch_size)))
                return segment_image(net, patched, image, device=attempt.device, sw_batch_size=attempt.batch_size,
                                     source=str(item.image))

            result = run_with_oom_retries(segment, attempt_box["attempt"], divisor, run.oom_retry, _free_cuda_memory)
            write_image(result.label, target)
            volumes = result.volumes_ml
        done = index + 1
        elapsed = time.monotonic() - started
        outputs.append({"id": item.id, "image": item.image, "label": target, "volumes_ml": volumes})
        run.events.emit("progress", stage="segmenting", iteration=done, total=len(job.images), id=item.id,
                        label=target, eta_s=elapsed / done * (len(job.images) - done), device=run.device,
                        memory_mb=peak_memory_mb(torch.device(run.device)))
    run.cancellation.commit()
    result = run.result(version=version, classes=card.classes.names, outputs=outputs, registry=registry.root)
    run.work.finish(result)
    return result


_RUNNERS = {"train": run_train, "learn": run_learn, "segment": run_segment}


# ----------------------------------------------------------------------------------------- entry
def run_job(job_path: str | Path, resume: bool = False, out: TextIO | None = None) -> int:
    """Run the job file ``job_path``, writing events to ``out`` (default stdout); returns the exit status."""
    events = EventStream(out or sys.stdout)
    cancellation = Cancellation(events)
    run: JobRun | None = None
    old_showwarning, old_tempdir = warnings.showwarning, tempfile.tempdir
    old_env = {k: os.environ.get(k) for k in ("TMPDIR", "MPLCONFIGDIR")}
    cancellation.install()
    try:
        events.emit("started", job_file=str(Path(job_path).absolute()), pid=os.getpid(), resume=resume,
                    cimis_version=__version__, python=sys.version.split()[0])
        job = load_job(job_path)
        events.job_id = job.id
        cancellation.watch_file(job.cancel_file)
        run = JobRun(job, events, cancellation, resume)
        warnings.showwarning = _warning_router(run)
        result = _RUNNERS[job.kind](run)
        if cancellation.reason is not None:
            result["cancel_ignored"] = f"{cancellation.reason} arrived after the new version was committed"
        events.emit("done", **result)
        return EXIT_DONE
    except BaseException as exc:  # every way out ends the stream with exactly one terminal event
        return _report(exc, events, cancellation, run)
    finally:
        warnings.showwarning = old_showwarning
        tempfile.tempdir = old_tempdir
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cancellation.uninstall()


def _report(exc: BaseException, events: EventStream, cancellation: Cancellation, run: JobRun | None) -> int:
    cancellation.reporting = True
    if run is not None and run.can_roll_back:
        run.work.roll_back()
    cancelled = _cancel_in(exc) or (cancellation.reason if not cancellation.committed else None)
    if cancelled is None and isinstance(exc, KeyboardInterrupt):
        cancelled = "SIGINT"
    if cancelled is not None:
        code = exit_code_for(cancelled)
        # Resumable whenever the job's state survived: --resume continues from its checkpoint, its label
        # maps or its finished model, or runs it again from the start in the same folder.
        resumable = run is not None and run.work.state_file.is_file()
        progress = "from the last checkpoint" if resumable and run.work.checkpoint_exists() else "the job"
        events.emit("cancelled", reason=cancelled, exit_code=code, forced=False, resumable=resumable,
                    message="the job was cancelled; the model registry is unchanged"
                            + (f"; --resume continues {progress}" if resumable else ""))
        cancellation.remove_cancel_file()
        return code
    user = user_error_in(exc)
    if user is not None:
        events.emit("error", kind="user", message=user.message, hint=user.hint, exit_code=EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    events.emit("error", kind="bug", exit_code=EXIT_BUG,
                message=f"internal error in CIMISLearner ({type(exc).__name__}: {exc})",
                hint="this is a bug, not a problem with your data: please report it with the worker's error output")
    return EXIT_BUG


def _cancel_in(exc: BaseException) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, JobCancelled):
            return exc.reason
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _warning_router(run: JobRun):
    """Warnings raised by the engine become ``warning`` events; third-party ones go to stderr."""
    package = str(Path(__file__).parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            run.warn(category.__name__, str(message))
        else:
            print(f"warning: {message}", file=sys.stderr)

    return show


def worker_main(job_path: str, resume: bool = False) -> int:
    """``cimis worker``: keep stdout for events only, then :func:`run_job`."""
    sys.stdout.flush()
    event_fd = os.dup(1)
    os.dup2(2, 1)  # whatever else writes to stdout (a library, a stray print) lands on stderr
    out = os.fdopen(event_fd, "w", buffering=1, encoding="utf-8", newline="\n")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("monai").setLevel(logging.ERROR)
    try:
        return run_job(job_path, resume, out)
    finally:
        out.flush()
