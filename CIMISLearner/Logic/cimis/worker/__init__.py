"""``cimis worker JOB.json``: run one job in its own process and report it as JSON lines on stdout.

The protocol (docs/worker-protocol.md) is versioned (:data:`PROTOCOL`): every stdout line is one JSON object
with ``event``, ``protocol``, ``time``, ``seq`` and ``job``; nothing else is written to stdout (the worker
moves file descriptor 1 to stderr and keeps a private copy for events). A stream starts with ``started`` and
ends with exactly one of ``done`` (exit 0), ``error`` (exit 2 for a problem the user can fix, 1 for a bug)
or ``cancelled`` (exit 130 after SIGINT, 143 after SIGTERM or the cancel file).

Safety rules the modules below keep:

* Inputs are checked before anything is written (:mod:`cimis.jobs`, :func:`cimis.registry.model_folder.verify_model_folder`);
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

One concept per module:

* :mod:`~cimis.worker.events` the event stream and the exit codes;
* :mod:`~cimis.worker.cancellation` signals, the cancel file and the watcher thread, with
  :mod:`~cimis.worker.owner_watch` (the client and parent processes whose end cancels the job);
* :mod:`~cimis.worker.oom` the out-of-memory policy;
* :mod:`~cimis.worker.fault_points` the pauses of the fault-injection tests;
* :mod:`~cimis.worker.work_folder` the job's output folder;
* :mod:`~cimis.worker.ranks` a train or learn job on several ranks (the worker is rank 0), with
  :mod:`~cimis.worker.rank`, the helper ranks' entry point;
* :mod:`~cimis.worker.job_run` one execution of a job, shared by the job kinds
  :mod:`~cimis.worker.train_job`, :mod:`~cimis.worker.learn_job`, :mod:`~cimis.worker.segment_job` and
  :mod:`~cimis.worker.import_job`;
* :mod:`~cimis.worker.main` the entry point (:func:`worker_main`, :func:`run_job`).

This package re-exports the names other code imports from ``cimis.worker``.
"""

from cimis.worker.cancellation import CANCEL_GRACE_S, CANCEL_POLL_S, Cancellation, JobCancelled, exit_code_for
from cimis.worker.events import (
    EXIT_BUG,
    EXIT_DONE,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USER_ERROR,
    PROTOCOL,
    EventStream,
)
from cimis.worker.fault_points import PAUSE_ENV, PAUSE_SECONDS, pause_point
from cimis.worker.import_job import run_import
from cimis.worker.job_run import STATE_FORMAT, JobRun
from cimis.worker.learn_job import run_learn
from cimis.worker.main import run_job, worker_main
from cimis.worker.oom import Attempt, is_cuda_oom, next_attempt_after_oom, run_with_oom_retries
from cimis.worker.owner_watch import OWNER_PID_ENV, OwnerWatch, process_alive
from cimis.worker.segment_job import run_segment
from cimis.worker.train_job import run_train
from cimis.worker.work_folder import WorkFolder

__all__ = [
    "CANCEL_GRACE_S", "CANCEL_POLL_S", "EXIT_BUG", "EXIT_DONE", "EXIT_SIGINT", "EXIT_SIGTERM", "EXIT_USER_ERROR",
    "OWNER_PID_ENV", "PAUSE_ENV", "PAUSE_SECONDS", "PROTOCOL", "STATE_FORMAT", "Attempt", "Cancellation",
    "EventStream", "JobCancelled", "JobRun", "OwnerWatch", "WorkFolder", "exit_code_for", "is_cuda_oom",
    "next_attempt_after_oom", "pause_point", "process_alive", "run_import", "run_job", "run_learn", "run_segment",
    "run_train", "run_with_oom_retries", "worker_main",
]
