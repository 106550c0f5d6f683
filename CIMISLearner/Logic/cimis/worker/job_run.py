"""One execution of a job, shared by the job kinds: stages and engine events become protocol events,
the device is chosen, the output folder is prepared, and the finished model is published once."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from cimis.errors import CimisError
from cimis.jobs import Job
from cimis.registry import Registry
from cimis.worker.cancellation import Cancellation
from cimis.worker.events import EventStream, utc_timestamp
from cimis.worker.fault_points import pause_point
from cimis.worker.oom import Attempt
from cimis.worker.work_folder import WorkFolder

STATE_FORMAT = "cimis-job-state/1"


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
            if self.job.devices:  # rank 0's GPU (the helper ranks take the others)
                device = f"cuda:{self.job.devices[0]}"
            index = int(device.split(":")[1])
            if index >= torch.cuda.device_count():
                raise CimisError(f"device {requested} does not exist ({torch.cuda.device_count()} GPUs)",
                                 "use cuda, cuda:0 or auto")
        else:
            device = "cpu"
            self.warn("no_gpu", "no CUDA GPU is available: running on the CPU, which is much slower")
        info: dict[str, Any] = {"device": device, "requested": requested, "cuda_available": cuda,
                                "threads": torch.get_num_threads()}
        if self.job.nproc > 1:  # rank 0's device; the other ranks take the next GPUs (or the CPU too)
            info.update(nproc=self.job.nproc, devices=self.job.devices or
                        ([f"cuda:{i}" for i in range(self.job.nproc)] if device.startswith("cuda") else None))
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
        if saved is None and self.work.holds_a_job():
            # Every job writes its state before run/, labels/ or result.json: without it these are a user's
            # files, which finishing would delete (run/) or take as the job's results (labels/).
            raise CimisError(f"the output folder {self.job.output} holds files of no job to resume "
                             "(run/, labels/ or result.json without job-state.json)",
                             "move them away, or give the job a new output folder")
        if saved is not None:
            recorded = saved.get("job", {})
            if saved.get("format") != STATE_FORMAT or recorded.get("kind") != self.job.kind or recorded.get("id") != self.job.id:
                raise CimisError(f"the output folder {self.job.output} holds another job ({recorded.get('kind')} "
                                 f"{recorded.get('id')!r})", "give the job a new output folder")
            return saved, True
        if self.resume:
            self.warn("nothing_to_resume", "this job has no saved progress yet: starting it from the beginning")
        return {"format": STATE_FORMAT, "job": self.job.to_json(), "token": uuid.uuid4().hex,
                "started": utc_timestamp(), **extra}, False

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
