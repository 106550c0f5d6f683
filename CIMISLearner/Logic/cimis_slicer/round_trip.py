"""The clinician's whole round on a phantom, in a few seconds: shared by the pytest bridge tests and the
module's in-Slicer self-test (``Slicer --no-main-window --python-code "slicer.selfTests['CIMISLearner']()"``).

Phantom CT (10 mm) -> tiny base model (liver, spleen, aorta) by a real train job -> Segment -> "stomach"
painted as a new structure -> Learn (a tiny job) -> the new version's pre-activation scores -> Activate ->
the CT segmented again with it.
Worker subprocesses use one torch thread: the machines that run it are small and shared.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cimis.errors import CimisError
from cimis_slicer.context import SlicerContext
from cimis_slicer.segments import add_new_structures, paint_segment, segments_of
from cimis_slicer.volume_files import read_volume
from cimis_slicer.worker_process import JobStatus, WorkerProcess
from cimis_slicer.workflow import JobSettings, LearnCase, Workflow

BASE_CLASSES = ["liver", "spleen", "aorta"]
NEW_CLASS = "stomach"
SPACING_MM = 10.0
TINY_NETWORK = {"filters": [4, 8, 16], "kernel_sizes": [3, 3, 3], "strides": [1, 2, 2]}
TINY_PREPROCESS = {"spacing": [SPACING_MM] * 3, "patch_size": [32, 32, 16]}
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
JOB_TIMEOUT_S = 240.0


def tiny_settings() -> JobSettings:
    return JobSettings(device="cpu", threads=1, iterations=2, batch_size=1)


def write_phantom_ct(folder: Path, seed: int = 11) -> tuple[Path, np.ndarray, object]:
    """A phantom CT file and its reference labels ``[k, j, i]`` and classes."""
    import SimpleITK as sitk

    from cimis.data.phantom import generate_phantom

    folder.mkdir(parents=True, exist_ok=True)
    phantom = generate_phantom(seed, spacing=(SPACING_MM,) * 3)
    sitk.WriteImage(phantom.image, str(folder / "ct.nii.gz"))
    return folder / "ct.nii.gz", sitk.GetArrayFromImage(phantom.label), phantom.classes


def make_base_registry(folder: Path, env: dict | None = None) -> Path:
    """``folder/registry`` with a tiny base model as v0001, trained by the real worker."""
    from cimis.data.phantom import write_phantom_dataset

    write_phantom_dataset(folder / "ds", num_cases=2, spacing=(SPACING_MM,) * 3, seed=5, val_cases=1, test_cases=0,
                          progress=False)
    job = {"format": "cimis-job/1", "kind": "train", "id": "base", "registry": str(folder / "registry"),
           "output": str(folder / "job" / "output"), "device": "cpu", "threads": 1,
           "budget": {"iterations": 2, "batch_size": 1, "checkpoint_every": 2, "val_every": 2},
           "data": {"manifest": str(folder / "ds" / "manifest.json"), "classes": BASE_CLASSES},
           "train": {"network": TINY_NETWORK, "preprocess": TINY_PREPROCESS, "note": "tiny base model"}}
    (folder / "job").mkdir(parents=True, exist_ok=True)
    (folder / "job" / "job.json").write_text(json.dumps(job))
    process = WorkerProcess(folder / "job" / "job.json", folder / "job" / "output" / "cancel", folder / "job",
                            env=WORKER_ENV if env is None else env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not process.status.finished:
        process.poll()
        if time.monotonic() > deadline:
            process.kill()
            raise CimisError(f"the base model was not trained within {JOB_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    if process.status.state != "done":
        raise CimisError(f"training the base model failed: {process.status.message}")
    return folder / "registry"


def wait(workflow: Workflow, timeout_s: float = JOB_TIMEOUT_S, idle=None) -> list[JobStatus]:
    """Poll as the widget's timer does until no job is left; returns each finished job's status.
    ``idle`` runs between polls (the self-test lets Slicer process events there)."""
    finished, deadline = [], time.monotonic() + timeout_s
    while workflow.busy:
        status = workflow.poll()
        if status is not None and status.finished:
            finished.append(status)
        if time.monotonic() > deadline:
            workflow.shutdown()
            raise CimisError(f"the job did not finish within {timeout_s:.0f} s")
        (idle or (lambda: time.sleep(0.1)))()
    return finished


@dataclass
class RoundResult:
    volume: object
    first: object  # the segmentation by the base model
    painted: object  # the clinician's new-structure segmentation
    painted_mask: np.ndarray
    learn_job: Path
    statuses: list[JobStatus] = field(default_factory=list)  # learn, then the re-segmentation
    second: object = None  # the segmentation by the new version
    scores: object = None  # the new version's pre-activation check (cimis_slicer.version_scores)


def run_round(context: SlicerContext, workdir: Path, registry: Path, env: dict | None = None, idle=None,
              keep_job_folders: bool = False) -> RoundResult:
    ct_path, labels, classes = write_phantom_ct(workdir / "phantom")
    volume = read_volume(context.scene, ct_path, "CT")
    workflow = Workflow(context, registry, workdir / "jobs", env=WORKER_ENV if env is None else env,
                        keep_job_folders=keep_job_folders)
    try:
        workflow.segment([volume], tiny_settings())
        [status] = wait(workflow, idle=idle)
        if status.state != "done":
            raise CimisError(f"Segment failed: {status.message}")
        [first] = workflow.outcome.segmentations
        painted = add_new_structures(context, volume, [NEW_CLASS], workflow.model_classes())
        mask = labels == classes.by_name(NEW_CLASS).value
        paint_segment(context, painted, segments_of(painted)[0].id, mask, volume)
        learn_job = workflow.learn([LearnCase(volume, painted)], tiny_settings())
        statuses = wait(workflow, idle=idle)
        if [s.state for s in statuses] != ["done"]:
            raise CimisError(f"Learn failed: {'; '.join(s.message for s in statuses)}")
        scores = workflow.outcome.scores  # the pre-activation check the panel shows
        workflow.activate_learned(tiny_settings())  # the clinician presses Activate; the CT is segmented again
        statuses += wait(workflow, idle=idle)
        if [s.state for s in statuses] != ["done", "done"]:
            raise CimisError(f"Segmenting with the new version failed: {statuses[-1].message}")
        [second] = workflow.outcome.segmentations
        return RoundResult(volume, first, painted, mask, learn_job, statuses, second, scores)
    finally:
        workflow.shutdown()
