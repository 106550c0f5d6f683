"""``cimis worker JOB.json``: run one job and end its event stream with exactly one terminal event."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import TextIO

from cimis import __version__
from cimis.errors import user_error_in
from cimis.jobs import load_job
from cimis.worker.cancellation import Cancellation, JobCancelled, exit_code_for
from cimis.worker.events import EXIT_BUG, EXIT_DONE, EXIT_USER_ERROR, EventStream
from cimis.worker.import_job import run_import
from cimis.worker.job_run import JobRun
from cimis.worker.learn_job import run_learn
from cimis.worker.segment_job import run_segment
from cimis.worker.train_job import run_train

_RUNNERS = {"train": run_train, "learn": run_learn, "segment": run_segment, "import": run_import}


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
    package = str(Path(__file__).parent.parent)  # the whole engine (cimis/), not only the worker

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
