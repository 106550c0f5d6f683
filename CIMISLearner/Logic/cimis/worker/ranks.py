"""A train or learn job on several ranks (``"nproc"`` or ``"devices"`` in the job file).

Rank 0 is the worker process itself, so its progress, metrics and checkpoints reach the one event stream
through the same ``on_event`` sink as a one-process job, cancellation stays the worker's own (signals, the
cancel file, a gone owner raise in the main thread, which is rank 0), and publishing happens once, in the
worker, after every rank has finished. Ranks 1..N-1 are helper processes (``python -m cimis.worker.rank``)
that join torch.distributed's ``env://`` rendezvous with rank 0 and run the same training call; they write
nothing to stdout, and report an error as one line in a file that the worker turns into its error event.

Why not torchrun's agent (cimis/launch.py): it starts every rank as its own child, so rank 0's events
would have to be relayed and a cancel forwarded through the agent; here the stream and the cancel need
nothing new. What the agent does for us there, this module does: it starts the helpers, watches them (one
that dies stops the job with one error line), and ends them when the job stops for any reason (a helper
also ends itself when the worker is gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cimis.errors import CimisError
from cimis.worker.cancellation import JobCancelled
from cimis.worker.oom import is_cuda_oom

HELPER_ERRORS_ENV = "CIMIS_RANK_ERRORS"  # the folder where helper rank R writes rank{R}.txt
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CIMIS_RANK_GPU")
OOM_LINE = "the GPU ran out of memory"
OOM_HINT = "lower budget.batch_size, or use fewer processes; a job of several processes is not retried smaller"
WATCH_S = 0.2
# A helper that died while rank 0 waits for it in a collective NCCL may never notice: after this long the
# worker reports the failure and ends itself (as the cancel watcher does).
STUCK_GRACE_S = 10.0


def check_ranks_present(nproc: int, devices: list[int] | None, device: str) -> None:
    """Refuse more ranks than this machine has GPUs (or CPU cores), and GPUs that are not present."""
    import torch

    from cimis.launch import available_slots

    if devices is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CimisError(f"'devices' lists GPUs {devices} and no CUDA GPU is present",
                             "leave 'devices' out; on the CPU use 'nproc'")
        missing = [d for d in devices if d >= count]
        if missing:
            raise CimisError(f"'devices' lists GPU {missing[0]}, and this machine has {count} "
                             f"(indices 0 to {count - 1})", f"list GPUs between 0 and {count - 1}")
        return
    slots, what = available_slots(device)
    if nproc > slots:
        raise CimisError(f"'nproc' {nproc} asks for more processes than the {slots} {what} here",
                         f"use 'nproc' {slots} or fewer" if slots > 1 else "leave 'nproc' out")


class HelperRanks:
    """``with HelperRanks(run, device, resume, base_version):`` ranks 1..N-1 run, and this process is rank 0
    of their process group, for the block. Leaving the block normally waits for the helpers; leaving it by an
    exception (a cancel, an error) ends them. A helper's failure becomes the block's :class:`CimisError`."""

    def __init__(self, run, device: str, resume: bool, base_version: str | None = None):
        self.run = run
        self.job = run.job
        self.device = device
        self.resume = resume
        self.base_version = base_version
        self.helpers: dict[int, subprocess.Popen] = {}
        self.failure: tuple[str, str | None] | None = None
        self.failed_at: float | None = None
        self.stopping = False
        self._stop = threading.Event()
        self._saved_env: dict[str, str | None] = {}
        self._group = None

    # ------------------------------------------------------------------------------------ the block
    def __enter__(self) -> "HelperRanks":
        from cimis import distributed
        from cimis.launch import master_port

        job, n = self.job, self.job.nproc
        self.errors = Path(tempfile.mkdtemp(prefix="ranks-", dir=self.run.work.tmp))
        port = str(master_port())
        gpus = job.devices or list(range(n))
        common = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        threads = str(job.threads or max(1, (os.cpu_count() or 1) // n))
        for rank in range(1, n):
            env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank), "CIMIS_RANK_GPU": str(gpus[rank]),
                   HELPER_ERRORS_ENV: str(self.errors), "OMP_NUM_THREADS": threads}
            command = [sys.executable, "-m", "cimis.worker.rank", str(job.source), "--device", self.device,
                       "--owner", str(os.getpid())]
            if self.resume:
                command.append("--resume")
            if self.base_version:
                command += ["--base-version", self.base_version]
            # A session of its own: a Ctrl-C in the terminal reaches the worker, which ends the helpers.
            self.helpers[rank] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno()
                                                  if _has_fileno(sys.stderr) else subprocess.DEVNULL,
                                                  start_new_session=True)
        self._saved_env = {k: os.environ.get(k) for k in RANK_ENV}
        os.environ.update(common, RANK="0", LOCAL_RANK="0", CIMIS_RANK_GPU=str(gpus[0]))
        self._watcher = threading.Thread(target=self._watch, name="cimis-rank-watcher", daemon=True)
        self._watcher.start()
        self._group = distributed.process_group(self.device)
        try:
            self._group.__enter__()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is None:
                self._wait_for_helpers()
            else:
                if not isinstance(exc, (JobCancelled, KeyboardInterrupt, CimisError)):
                    self._await_a_failure(2.0)  # rank 0's collective failed: a helper's end says why
                self._end_helpers()
        finally:
            self._stop.set()
            if self._group is not None:
                group, self._group = self._group, None
                try:
                    group.__exit__(None, None, None)
                except Exception:
                    pass
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            import shutil

            shutil.rmtree(self.errors, ignore_errors=True)
        if isinstance(exc, (JobCancelled, KeyboardInterrupt)):
            return False
        if self.failure is not None:
            raise CimisError(*self.failure) from None
        if exc is not None and is_cuda_oom(exc):
            raise CimisError(OOM_LINE, OOM_HINT) from None
        return False

    # ------------------------------------------------------------------------------------- helpers
    def _wait_for_helpers(self) -> None:
        deadline = time.monotonic() + 120
        for rank, proc in self.helpers.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.failure = self.failure or (f"training process {rank} of {self.job.nproc} did not finish", None)
        self._record_failures()
        self._end_helpers()

    def _await_a_failure(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.failure is None and time.monotonic() < deadline:
            self._record_failures()
            time.sleep(0.05)

    def _end_helpers(self) -> None:
        self.stopping = True
        for proc in self.helpers.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.helpers.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _record_failures(self) -> None:
        if self.failure is not None or self.stopping:
            return
        for rank, proc in sorted(self.helpers.items()):
            code = proc.poll()
            if code is None or code == 0:
                continue
            self.failure, self.failed_at = self._explain(rank, code), time.monotonic()
            return

    def _explain(self, rank: int, code: int) -> tuple[str, str | None]:
        n = self.job.nproc
        line_file = self.errors / f"rank{rank}.txt"
        line = line_file.read_text().strip() if line_file.is_file() else ""
        if line:
            return f"process {rank} of {n}: {line}", None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
            else f"stopped with exit status {code}"
        resume = "--resume continues the job from its last checkpoint" if self.run.work.checkpoint_exists() \
            else "run the job again with --resume"
        return f"training process {rank} of {n} {how}; the others were stopped", resume

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            self._record_failures()
            if self.failure is not None and time.monotonic() - self.failed_at > STUCK_GRACE_S:
                self._force_exit()

    def _force_exit(self) -> None:
        """Rank 0 is stuck in a collective with a helper that is gone: report and end (kill -9 safe)."""
        from cimis.worker.events import EXIT_USER_ERROR

        cancellation = self.run.cancellation
        if self._stop.is_set() or cancellation.reason is not None or self.run.events.terminal is not None:
            return
        self._end_helpers()
        message, hint = self.failure
        self.run.events.emit("error", kind="user", message=message, hint=hint, exit_code=EXIT_USER_ERROR)
        try:
            sys.stderr.flush()
        finally:
            os._exit(EXIT_USER_ERROR)


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def check_ranks(job) -> None:
    """:func:`check_ranks_present` for a job of several ranks; nothing for one."""
    if job.nproc > 1:
        check_ranks_present(job.nproc, job.devices, job.device)
        batch = job.budget.batch_size
        if batch is not None and batch % job.nproc:  # the engine would say so too, after the folder is made
            raise CimisError(f"budget.batch_size {batch} does not split evenly over {job.nproc} processes",
                             f"choose a batch size that is a multiple of {job.nproc} (the batch is global)")
