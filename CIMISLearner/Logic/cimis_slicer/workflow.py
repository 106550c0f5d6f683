"""What the module's buttons do, without Qt: Segment, Learn, Cancel, the version list and rollback.

A :class:`Workflow` owns at most one running job. Starting one checks the input and writes the job folder
(inputs exported from the scene, ``job.json``) before the worker starts, so bad input ends in a
:class:`~cimis.errors.CimisError` and an untouched scene. :meth:`Workflow.poll` is called from the widget's
timer; when a job ends it imports the result into *new* segmentation nodes (nothing in the scene is ever
replaced), and after a learn job it re-segments the volumes with the new, now active, version.

Job folders: ``JOBS/<id>/job.json``, ``inputs/`` (volumes and new-structure label maps), ``output/`` (the
worker's own folder) and ``worker-stderr.log``.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cimis.data.classes import ClassInfo, ClassSet
from cimis.errors import CimisError
from cimis.registry import Registry, VersionInfo, classes_of
from cimis_slicer.context import SlicerContext
from cimis_slicer.segments import (export_label_array, import_label_array, painted_voxels, segments_to_learn,
                                   check_same_grid)
from cimis_slicer.volume_files import read_label_array, write_label_array, write_volume
from cimis_slicer.volumes import check_not_transformed, geometry_of
from cimis_slicer.worker_process import DONE, JobStatus, WorkerProcess

JOB_FORMAT = "cimis-job/1"
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("pgcd-dapd", "ft", "lwf", "ilt", "mib", "plop")


@dataclass
class JobSettings:
    """The panel's settings; None leaves the choice to the engine (learn: the model's own step-0 budget)."""

    device: str = "auto"
    strategy: str = "pgcd-dapd"
    iterations: int | None = None
    batch_size: int | None = None
    threads: int | None = None  # torch threads; fewer keep Slicer responsive while the job runs
    note: str = ""

    def check(self) -> None:
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise CimisError(f"unknown device {self.device!r}", f"use one of {', '.join(DEVICES)}")
        if self.strategy not in STRATEGIES:
            raise CimisError(f"unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        for name in ("iterations", "batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CimisError(f"the {name.replace('_', ' ')} must be a positive whole number, got {value!r}")


@dataclass
class LearnCase:
    """A volume and the segmentation in which the new structures are painted on it."""

    volume_node: object
    segmentation_node: object


@dataclass
class _Task:
    kind: str
    folder: Path
    process: WorkerProcess
    on_done: Callable[[dict], None]


@dataclass
class Outcome:
    """What the last finished job left behind, for the panel and for tests."""

    message: str = ""
    version: str | None = None
    new_classes: list[str] = field(default_factory=list)
    segmentations: list = field(default_factory=list)  # segmentation nodes it added to the scene


class Workflow:
    """Segment and Learn over a model registry for one Slicer scene.

    Args:
        context: the scene and Slicer logics.
        registry: the model registry folder (docs/registry.md).
        jobs_dir: where job folders are written (outside the registry).
        python, env: how to run the worker (defaults: Slicer's Python, this environment).
    """

    def __init__(self, context: SlicerContext, registry: str | Path, jobs_dir: str | Path,
                 python: str | None = None, env: dict | None = None):
        self.context = context
        self.registry_path = Path(registry).absolute()
        self.jobs_dir = Path(jobs_dir).absolute()
        self.python = python
        self.env = env
        self.task: _Task | None = None
        self.outcome = Outcome()

    # ----------------------------------------------------------------------------------------- registry
    @property
    def registry(self) -> Registry:
        return Registry.open(self.registry_path)

    def model_classes(self, version: str | None = None) -> ClassSet:
        registry = self.registry
        name = registry.resolve(version)
        return classes_of(registry.card(name), f"model version {name}")

    def versions(self) -> list[VersionInfo]:
        """Oldest first; ``active`` marks the one Segment and Learn use."""
        return self.registry.list()

    def activate(self, version: str) -> str:
        """Rollback (or roll forward): make ``version`` the active one. Refused while a job runs, because
        the job reads the active version when it starts."""
        if self.busy:
            raise CimisError("a job is running", "wait for it to finish or cancel it before changing the version")
        return self.registry.activate(version)

    # ------------------------------------------------------------------------------------------- jobs
    @property
    def busy(self) -> bool:
        return self.task is not None

    def segment(self, volume_nodes: list, settings: JobSettings | None = None, new_classes: list[str] = ()) -> Path:
        """Start segmenting the volumes with the active model; each result becomes a new segmentation node."""
        settings = settings or JobSettings()
        self._refuse_if_busy()
        volume_nodes = [v for v in volume_nodes if v is not None]
        if not volume_nodes:
            raise CimisError("no volume is selected", "choose the CT volume to segment")
        settings.check()
        for volume in volume_nodes:
            check_not_transformed(volume, "volume")
            geometry_of(volume)
        self.model_classes()  # a registry with a readable active model, before anything is written
        folder, job_id = self._new_job_folder("segment")
        images, by_id = [], {}
        for n, volume in enumerate(volume_nodes):
            case_id = f"{n + 1:02d}-{_safe(volume.GetName())}"
            image = write_volume(self.context.scene, volume, folder / "inputs" / f"{case_id}.nrrd")
            images.append({"id": case_id, "image": str(image)})
            by_id[case_id] = volume
        job = self._job_header("segment", job_id, folder, settings)
        job["data"] = {"images": images}

        def on_done(result: dict) -> None:
            version = result.get("version")
            classes = self.model_classes(version)
            created = []
            for item in result.get("outputs", []):
                volume = by_id[item["id"]]
                labels = read_label_array(self.context.scene, Path(item["label"]), geometry_of(volume))
                name = f"{volume.GetName()} segmentation {version}"
                created.append(import_label_array(self.context, labels, volume, classes, name, new_classes, version))
            self.outcome.segmentations.extend(created)
            self.outcome.version = version
            marked = f"; new: {', '.join(new_classes)}" if new_classes else ""
            self.outcome.message = (f"segmented {len(created)} volume(s) with {version} "
                                    f"({len(classes)} classes{marked})")

        self._start("segment", folder, job, on_done, fresh_outcome=not new_classes)
        return folder

    def learn(self, cases: list[LearnCase], settings: JobSettings | None = None, resegment: bool = True) -> Path:
        """Start learning the painted new structures; only segments whose names the model does not know are
        sent as labels. When the new version is active, the volumes are segmented again with it."""
        settings = settings or JobSettings()
        self._refuse_if_busy()
        settings.check()
        cases = [c for c in cases if c.volume_node is not None]
        if not cases:
            raise CimisError("no volume is selected", "choose the CT volume on which the new structures are painted")
        if any(c.segmentation_node is None for c in cases):
            raise CimisError("no segmentation with new structures is selected",
                             "press Add new structures, paint them in the Segment Editor, then Learn")
        known = self.model_classes()
        exported, new_classes = self._export_new_structures(cases, known)
        folder, job_id = self._new_job_folder("learn")
        job_cases = []
        for n, (case, labels, values) in enumerate(exported):
            case_id = f"{n + 1:02d}-{_safe(case.volume_node.GetName())}"
            image = write_volume(self.context.scene, case.volume_node, folder / "inputs" / f"{case_id}.nrrd")
            label_array = values[labels]  # segment order -> class label values
            label = write_label_array(self.context.scene, label_array, geometry_of(case.volume_node),
                                      folder / "inputs" / f"{case_id}-new.nrrd")
            job_cases.append({"id": case_id, "image": str(image), "label": str(label)})
        job = self._job_header("learn", job_id, folder, settings)
        budget = {k: getattr(settings, k) for k in ("iterations", "batch_size") if getattr(settings, k) is not None}
        if budget:
            job["budget"] = budget
        job["data"] = {"classes": [c.to_json() for c in new_classes], "cases": job_cases}
        job["learn"] = {"strategy": settings.strategy,
                        "note": settings.note or f"learned {', '.join(new_classes.names)} in 3D Slicer"}
        volumes = [c.volume_node for c in cases]

        def on_done(result: dict) -> None:
            self.outcome = Outcome(version=result.get("version"), new_classes=list(result.get("new_classes", [])))
            self.outcome.message = (f"{result.get('version')} is active: learned {', '.join(self.outcome.new_classes)}")
            if resegment:
                learned = self.outcome
                self.segment(list(dict.fromkeys(volumes)), settings, new_classes=learned.new_classes)
                self.outcome = learned
                self.outcome.message += "; segmenting again with it"

        self._start("learn", folder, job, on_done)
        return folder

    def _export_new_structures(self, cases: list[LearnCase], known: ClassSet):
        """Per case: the painted new structures as a label array (segment order) and the value lookup;
        and the new classes with label values after the model's. Raises for anything that cannot be learned."""
        import numpy as np

        names: dict[str, ClassInfo] = {}
        next_value = max(known.values, default=0) + 1
        exported = []
        for case in cases:
            volume, segmentation = case.volume_node, case.segmentation_node
            check_same_grid(segmentation, volume)
            chosen = segments_to_learn(segmentation, known)
            if not chosen:
                raise CimisError(f"the segmentation {segmentation.GetName()!r} has no new structure",
                                 "press Add new structures and paint them; segments of organs the model already "
                                 "knows are not sent")
            labels = export_label_array(self.context, segmentation, [s.id for s in chosen], volume)
            counts = painted_voxels(labels, len(chosen))
            if not any(counts):
                raise CimisError(f"no new structure is painted in {segmentation.GetName()!r} "
                                 f"({', '.join(s.name for s in chosen)} are empty)",
                                 "paint the new structures with the Segment Editor, then press Learn")
            values = np.zeros(len(chosen) + 1, np.uint16)
            for n, (segment, count) in enumerate(zip(chosen, counts), start=1):
                if not count:
                    continue  # an empty segment teaches nothing; the others on this volume still count
                key = segment.name.lower()
                if key not in names:
                    names[key] = ClassInfo(segment.name, next_value, segment.color)
                    next_value += 1
                values[n] = names[key].value
            dtype = np.uint8 if next_value <= 256 else np.uint16
            exported.append((case, labels, values.astype(dtype)))
        return exported, ClassSet(names.values())

    def poll(self) -> JobStatus | None:
        """Read the running job's new events (never waits). When it has ended, import its result; a failure
        while importing becomes the job's error. Returns the job's status, or None when nothing ran."""
        task = self.task
        if task is None:
            return None
        task.process.poll()
        status = task.process.status
        if not status.finished:
            return status
        self.task = None
        if status.state == DONE:
            try:
                task.on_done(status.result)
            except CimisError as exc:
                status.state, status.message = "error", exc.one_line()
        else:
            self.outcome.message = status.message
        return status

    def cancel(self) -> None:
        if self.task is not None:
            self.task.process.cancel()

    def shutdown(self) -> None:
        """Slicer is closing: the worker's cancel file first, then its whole process tree (the real Python
        behind the PythonSlicer launcher too); the job publishes nothing."""
        if self.task is not None:
            self.task.process.shutdown()
            self.task = None

    # ---------------------------------------------------------------------------------------- helpers
    def _refuse_if_busy(self) -> None:
        if self.busy:
            raise CimisError("a job is already running", "wait for it to finish, or cancel it")

    def _new_job_folder(self, kind: str) -> tuple[Path, str]:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        job_id = f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"
        folder = self.jobs_dir / job_id
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise CimisError(f"cannot create the job folder {folder}: {exc.strerror or exc}",
                             "choose a writable folder for jobs") from None
        return folder, job_id

    def _job_header(self, kind: str, job_id: str, folder: Path, settings: JobSettings) -> dict:
        job = {"format": JOB_FORMAT, "kind": kind, "id": job_id, "registry": str(self.registry_path),
               "output": str(folder / "output"), "device": settings.device}
        if settings.threads is not None:
            job["threads"] = settings.threads
        return job

    def _start(self, kind: str, folder: Path, job: dict, on_done, fresh_outcome: bool = True) -> None:
        job_file = folder / "job.json"
        job_file.write_text(json.dumps(job, indent=1), encoding="utf-8")
        process = WorkerProcess(job_file, Path(job["output"]) / "cancel", folder, self.python, self.env)
        if fresh_outcome:
            self.outcome = Outcome()
        self.task = _Task(kind, folder, process, on_done)


def _safe(name: str) -> str:
    """A volume name as a job case id: letters, digits, '.', '_', '-'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return text[:60] or "volume"
