"""What the module's buttons do, without Qt: Segment, Learn, Cancel, the version list and rollback.

A :class:`Workflow` owns at most one running job. Starting one checks the input and writes the job folder
(inputs exported from the scene, ``job.json``) before the worker starts, so bad input ends in a
:class:`~cimis.errors.CimisError` and an untouched scene. :meth:`Workflow.poll` is called from the widget's
timer; when a job ends it imports the result into *new* segmentation nodes (nothing in the scene is ever
replaced), and after a learn job it re-segments the volumes with the new, now active, version.

Job folders: ``JOBS/<id>/owner.pid``, ``job.json``, ``inputs/`` (volumes and new-structure label maps,
uncompressed so that writing them is quick), ``output/`` (the worker's own folder) and ``worker-stderr.log``;
owner-only (0700), since they hold a copy of the patient's images. They do not stay: a job whose inputs
cannot all be written or whose worker cannot start leaves no folder; once a job's result is imported only
``events.jsonl``, ``result.json`` and the log are kept (a few kB); and every folder of this module (a finished
job's logs, a cancelled or failed job's images, what a crashed session left) is removed when the next job
starts and when Slicer closes (:meth:`Workflow.shutdown`), except another running Slicer's. Resume lives in
this session's memory, so a cancelled Learn can be resumed until then. ``keep_job_folders`` keeps
everything, for debugging.

A learn job leaves its new version inactive (unless ``JobSettings.auto_activate``): the panel shows the
version's pre-activation scores (:mod:`cimis_slicer.version_scores`) and :meth:`Workflow.activate_learned`
makes it live and segments the volumes again with it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import stat
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from cimis.data.classes import ClassInfo, ClassSet
from cimis.errors import CimisError
from cimis.registry import Registry, VersionInfo, classes_of
from cimis_slicer.context import SlicerContext
from cimis_slicer.dependencies import require_engine
from cimis_slicer.segments import (export_label_array, import_label_array, painted_voxels, segments_of,
                                   segments_to_learn, check_same_grid)
from cimis_slicer.volume_files import read_label_array, write_label_array, write_volume
from cimis_slicer.volumes import check_not_transformed, geometry_of
from cimis_slicer.version_scores import VersionScores
from cimis_slicer.worker_process import CANCELLED, DONE, ERROR, JobStatus, WorkerProcess

JOB_FORMAT = "cimis-job/1"
JOB_KINDS = ("segment", "learn", "train", "import")
JOB_FOLDER_NAME = re.compile(rf"(?:{'|'.join(JOB_KINDS)})-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}")
OWNER_FILE = "owner.pid"  # the Slicer process that started the job
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("pgcd-dapd", "ft", "pseudo-labels", "lwf", "ilt", "mib", "plop")


@dataclass
class JobSettings:
    """The panel's settings; None leaves the choice to the engine (learn: the model's own step-0 budget)."""

    device: str = "auto"
    strategy: str = "pgcd-dapd"
    iterations: int | None = None
    batch_size: int | None = None
    threads: int | None = None  # torch threads; fewer keep Slicer responsive while the job runs
    note: str = ""
    auto_activate: bool = False  # learn: make the new version live without the pre-activation look (batch use)

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
    validation: bool = False  # kept out of training; the new organs' Dice is measured on it before activation


@dataclass
class _Task:
    kind: str
    folder: Path
    process: WorkerProcess
    on_done: Callable[[dict], None]
    resume: Callable[[], None] | None = None  # restarts this job with --resume (learn)


@dataclass
class Outcome:
    """What the last finished job left behind, for the panel and for tests."""

    message: str = ""
    version: str | None = None
    new_classes: list[str] = field(default_factory=list)
    segmentations: list = field(default_factory=list)  # segmentation nodes it added to the scene
    scores: VersionScores | None = None  # a learn job's pre-activation check of its new version
    awaiting_activation: bool = False  # a learned version is published but not active yet
    volumes: list = field(default_factory=list)  # the volumes a learn job learned from (to segment again)


class Workflow:
    """Segment and Learn over a model registry for one Slicer scene.

    Args:
        context: the scene and Slicer logics.
        registry: the model registry folder (docs/registry.md).
        jobs_dir: where job folders are written (outside the registry).
        python, env: how to run the worker (defaults: Slicer's Python, this environment).
    """

    def __init__(self, context: SlicerContext, registry: str | Path | None, jobs_dir: str | Path,
                 python: str | None = None, env: dict | None = None, keep_job_folders: bool = False):
        self.context = context
        self.task: _Task | None = None
        self._registry_path = Path(registry).absolute() if registry else None
        self.jobs_dir = Path(jobs_dir).absolute()
        self.python = python
        self.env = env
        self.keep_job_folders = keep_job_folders
        self.outcome = Outcome()
        self.resumable: _Task | None = None  # the last cancelled learn job, which Resume continues
        self.log: list[str] = []  # the worker's warnings and stage changes, for the log panel
        self._finishing: Path | None = None
        # What a crashed or killed session left (copies of a patient's images) goes when the module opens,
        # not only at the first job or at close, which may never come.
        self._remove_job_folders()

    # ----------------------------------------------------------------------------------------- registry
    @property
    def registry_path(self) -> Path | None:
        return self._registry_path

    @registry_path.setter
    def registry_path(self, path: str | Path | None) -> None:
        """Switch registries; refused while a job runs (it belongs to the registry it started on, and would
        be left without a result, a Cancel or a clean-up)."""
        new = Path(path).absolute() if path else None
        if new == self._registry_path:
            return
        if self.busy:
            raise CimisError("a job is running on the current model registry",
                             "wait for it to finish or cancel it before choosing another registry")
        self._registry_path = new
        self.outcome = Outcome()
        self.resumable = None

    @property
    def registry(self) -> Registry:
        if self._registry_path is None:
            raise CimisError("no model registry is chosen", "choose a folder of model versions, or an empty folder")
        return Registry.open(self._registry_path)

    def registry_is_empty(self) -> bool:
        """A chosen folder with no model version yet (new or empty): the panel offers Import and Train."""
        path = self._registry_path
        if path is None:
            return False
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return True
        try:
            return not Registry.open(path).version_names()
        except CimisError:
            return False

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
        name = self.registry.activate(version)
        if name == self.outcome.version:
            self.outcome.awaiting_activation = False
        return name

    def activate_learned(self, settings: JobSettings | None = None) -> str:
        """After a look at the scores: make the version the last learn job published the active one and
        segment its volumes again with it (old and new organs, the new ones marked)."""
        learned = self.outcome
        if not learned.awaiting_activation or not learned.version:
            raise CimisError("no learned version is waiting for activation", "press Learn first")
        name = self.activate(learned.version)
        volumes = [v for v in learned.volumes if self._in_scene(v)]
        if volumes:
            self.segment(volumes, settings, new_classes=learned.new_classes)
        self.outcome = learned
        learned.message = f"{name} is active" + ("; segmenting again with it" if volumes else "")
        return name

    def delete_version(self, version: str) -> str:
        """Remove a version that is not the active one (the registry refuses the active one)."""
        self._refuse_if_busy()
        return self.registry.delete(version)

    def export_version(self, version: str, archive: str | Path) -> Path:
        """Write one version as a .tar.gz archive that Import model reads back."""
        return self.registry.export(version, archive)

    def import_model(self, source: str | Path, classes: list[str] | None = None, fold: int | None = None,
                     settings: JobSettings | None = None, volumes: list[str | Path] = (),
                     spacing: list[float] | None = None, window: list[float] | None = None,
                     patch_size: list[int] | None = None) -> str | Path:
        """Add a model to the registry (an empty folder becomes a registry); the first version becomes the
        active one. Needs the engine.

        A model archive or model folder of CIMISLearner is added at once and its version name returned. A
        MONAI bundle or an nnU-Net v2 model folder is converted by the worker's import job in the background
        (minutes for a large model): its job folder is returned, as :meth:`segment` does, and :meth:`poll`
        follows it. ``classes`` keeps a subset of the source's classes (None: all); ``fold``, ``spacing``,
        ``window`` and ``patch_size`` are ``cimis import-model``'s options, ``volumes`` the unlabelled CTs
        for the global prototypes.
        """
        from cimis_slicer.model_import import CIMIS_MODEL, source_kind

        self._refuse_if_busy()
        if self._registry_path is None:
            raise CimisError("no model registry is chosen", "choose a folder for the model versions first")
        require_engine("Import model")
        source = Path(source).absolute()
        if source_kind(source) == CIMIS_MODEL:
            registry = Registry.open(self._registry_path, create=True)
            return registry.import_model(source, activate=registry.active_version() is None)
        settings = settings or JobSettings()
        settings.check()

        def on_done(result: dict) -> None:
            version, kept = result.get("version"), list(result.get("classes", []))
            self.outcome = Outcome(version=version)
            self.outcome.message = (f"{version} imported from {source.name} ({len(kept)} classes: "
                                    f"{', '.join(kept[:10])}{' ...' if len(kept) > 10 else ''})"
                                    + ("; it is the active version" if result.get("active") else ""))

        with self._new_job("import") as (folder, job_id):
            job = self._job_header("import", job_id, folder, settings)
            options = {"classes": list(classes) if classes else None, "fold": fold, "spacing": spacing,
                       "window": window, "patch_size": patch_size}
            job["import"] = {"source": str(source), **{k: v for k, v in options.items() if v is not None},
                             "note": settings.note or f"imported from {source.name} in 3D Slicer"}
            if volumes:
                job["data"] = {"volumes": [str(Path(v).absolute()) for v in volumes]}
            self._start("import", folder, job, on_done)
        return folder

    # ------------------------------------------------------------------------------------------- jobs
    @property
    def busy(self) -> bool:
        return self.task is not None

    def segment(self, volume_nodes: list, settings: JobSettings | None = None, new_classes: list[str] = ()) -> Path:
        """Start segmenting the volumes with the active model; each result becomes a new segmentation node."""
        settings = settings or JobSettings()
        self._refuse_if_busy()
        require_engine("Segment")
        volume_nodes = [v for v in volume_nodes if v is not None]
        if not volume_nodes:
            raise CimisError("no volume is selected", "choose the CT volume to segment")
        settings.check()
        for volume in volume_nodes:
            check_not_transformed(volume, "volume")
            geometry_of(volume)
        self.model_classes()  # a registry with a readable active model, before anything is written
        by_id = {f"{n + 1:02d}-{_safe(volume.GetName())}": volume for n, volume in enumerate(volume_nodes)}

        def on_done(result: dict) -> None:
            version = result.get("version")
            # The scene may have been closed (and another patient loaded) while the job ran: a result is
            # only placed on its own volume, still in this scene.
            present = {case_id: v for case_id, v in by_id.items() if self._in_scene(v)}
            if not present:
                raise CimisError("the scene this job segmented was closed; its result was not loaded",
                                 "press Segment again on a volume of the current scene")
            classes = self.model_classes(version)
            created = []
            for item in result.get("outputs", []):
                volume = present.get(item["id"])
                if volume is None:
                    continue  # removed from the scene while the job ran
                labels = read_label_array(self.context.scene, Path(item["label"]), geometry_of(volume))
                # The node's name marks the version's new organs, visibly, in every node list of Slicer; the
                # segments keep the class names, which later Learn steps match on.
                marked = f" (new: {', '.join(new_classes)})" if new_classes else ""
                name = f"{volume.GetName()} segmentation {version}{marked}"
                created.append(import_label_array(self.context, labels, volume, classes, name, new_classes, version))
            self.outcome.segmentations.extend(created)
            self.outcome.version = version
            marked = f"; new: {', '.join(new_classes)}" if new_classes else ""
            gone = len(by_id) - len(present)
            self.outcome.message = (f"segmented {len(created)} volume(s) with {version} "
                                    f"({len(classes)} classes{marked})"
                                    + (f"; {gone} volume(s) removed from the scene were left out" if gone else ""))

        with self._new_job("segment") as (folder, job_id):
            images = []
            for case_id, volume in by_id.items():
                image = write_volume(self.context.scene, volume, folder / "inputs" / f"{case_id}.nrrd")
                images.append({"id": case_id, "image": str(image)})
            job = self._job_header("segment", job_id, folder, settings)
            job["data"] = {"images": images}
            self._start("segment", folder, job, on_done, fresh_outcome=not new_classes)
        return folder

    def learn(self, cases: list[LearnCase], settings: JobSettings | None = None, resegment: bool = True) -> Path:
        """Start learning the painted new structures; only segments whose names the model does not know are
        sent as labels. The new version is scored before it may go live (``Outcome.scores``); it is left
        inactive for :meth:`activate_learned` unless ``settings.auto_activate``, in which case the volumes
        are segmented again with it at once (``resegment``)."""
        settings = settings or JobSettings()
        self._refuse_if_busy()
        require_engine("Learn")
        settings.check()
        cases = [c for c in cases if c.volume_node is not None]
        if not cases:
            raise CimisError("no volume is selected", "choose the CT volume on which the new structures are painted")
        if any(c.segmentation_node is None for c in cases):
            raise CimisError("no segmentation with new structures is selected",
                             "press Add new structures, paint them in the Segment Editor, then Learn")
        known = self.model_classes()
        exported, new_classes = self._export_new_structures(cases, known)
        if all(c.validation for c in cases):
            raise CimisError("every painted volume is marked for validation",
                             "leave at least one volume for learning")
        volumes = list(dict.fromkeys(c.volume_node for c in cases))

        def on_done(result: dict) -> None:
            version = result.get("version")
            self.outcome = Outcome(version=version, new_classes=list(result.get("new_classes", [])),
                                   volumes=volumes, awaiting_activation=not result.get("active", False))
            if result.get("check"):
                self.outcome.scores = VersionScores.from_check(result["check"])
            learned = ", ".join(self.outcome.new_classes)
            if self.outcome.awaiting_activation:
                self.outcome.message = (f"{version} learned {learned}: check its scores, then press Activate "
                                        f"({self.outcome.scores.summary() if self.outcome.scores else 'no scores'})")
                return
            self.outcome.message = f"{version} is active: learned {learned}"
            still_here = [v for v in volumes if self._in_scene(v)]
            if resegment and still_here:
                kept = self.outcome
                self.segment(still_here, settings, new_classes=kept.new_classes)
                self.outcome = kept
                self.outcome.message += "; segmenting again with it"

        with self._new_job("learn") as (folder, job_id):
            job = self._job_header("learn", job_id, folder, settings)
            job["data"] = {"classes": [c.to_json() for c in new_classes],
                           "cases": self._write_cases(folder, exported, cases)}
            self._add_budget(job, settings)
            job["learn"] = {"strategy": settings.strategy, "activate": settings.auto_activate,
                            "note": settings.note or f"learned {', '.join(new_classes.names)} in 3D Slicer"}
            self._start("learn", folder, job, on_done)
        return folder

    def resume(self) -> Path:
        """Continue the last cancelled Learn from its last checkpoint (the worker's ``--resume``)."""
        self._refuse_if_busy()
        task = self.resumable
        if task is None or not task.folder.is_dir():
            raise CimisError("there is no cancelled Learn to resume", "press Learn to start one")
        require_engine("Resume")
        self.resumable = None
        process = WorkerProcess(task.folder / "job.json", task.process.cancel_file, task.folder, self.python,
                                self._worker_env(), resume=True)
        self.outcome = Outcome()
        self.task = _Task(task.kind, task.folder, process, task.on_done)
        return task.folder

    def train_first_model(self, cases: list[LearnCase], settings: JobSettings | None = None,
                          network: str | dict = "small", preprocess: dict | None = None) -> Path:
        """An empty registry's first model, from painted volumes: every painted segment becomes a class
        (the worker's train job). The registry folder is created by the job."""
        settings = settings or JobSettings()
        self._refuse_if_busy()
        if self._registry_path is None:
            raise CimisError("no model registry is chosen", "choose an empty folder for the new registry")
        if not self.registry_is_empty():
            raise CimisError(f"{self._registry_path} already holds model versions",
                             "Learn adds organs to an existing model; choose an empty folder to train a new one")
        require_engine("Train a first model")
        settings.check()
        cases = [c for c in cases if c.volume_node is not None]
        if not cases:
            raise CimisError("no volume is selected", "choose the CT volume on which the organs are painted")
        if any(c.segmentation_node is None for c in cases):
            raise CimisError("no painted segmentation is selected", "paint the organs in the Segment Editor first")
        exported, classes = self._export_new_structures(cases, ClassSet([]), every_segment=True)

        def on_done(result: dict) -> None:
            self.outcome = Outcome(version=result.get("version"), new_classes=list(result.get("classes", [])))
            self.outcome.message = f"{result.get('version')} is active: a first model of {', '.join(classes.names)}"

        with self._new_job("train") as (folder, job_id):
            job = self._job_header("train", job_id, folder, settings)
            job["data"] = {"classes": [c.to_json() for c in classes],
                           "cases": self._write_cases(folder, exported, cases)}
            self._add_budget(job, settings)
            job["train"] = {"network": network, "activate": True,
                            **({"preprocess": preprocess} if preprocess else {}),
                            "note": settings.note or f"first model ({', '.join(classes.names)}) trained in 3D Slicer"}
            self._start("train", folder, job, on_done)
        return folder

    def _write_cases(self, folder: Path, exported: list, cases: list[LearnCase]) -> list[dict]:
        """Write each case's volume and painted label map into ``folder/inputs``; the job's case entries."""
        job_cases = []
        for n, (case, labels, values) in enumerate(exported):
            case_id = f"{n + 1:02d}-{_safe(case.volume_node.GetName())}"
            image = write_volume(self.context.scene, case.volume_node, folder / "inputs" / f"{case_id}.nrrd")
            label_array = values[labels]  # segment order -> class label values
            label = write_label_array(self.context.scene, label_array, geometry_of(case.volume_node),
                                      folder / "inputs" / f"{case_id}-new.nrrd")
            job_cases.append({"id": case_id, "image": str(image), "label": str(label),
                              "split": "val" if case.validation else "train"})
        return job_cases

    def _export_new_structures(self, cases: list[LearnCase], known: ClassSet, every_segment: bool = False):
        """Per case: the painted new structures as a label array (segment order) and the value lookup;
        and the new classes with label values after the model's. Raises for anything that cannot be learned.
        ``every_segment``: every segment is a class to learn (a first model)."""
        import numpy as np

        names: dict[str, ClassInfo] = {}
        next_value = max(known.values, default=0) + 1
        exported = []
        for case in cases:
            volume, segmentation = case.volume_node, case.segmentation_node
            check_same_grid(segmentation, volume)
            chosen = segments_of(segmentation) if every_segment else segments_to_learn(segmentation, known)
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
        for event in task.process.poll():
            line = _log_line(event)
            if line:
                self.log.append(line)
        status = task.process.status
        if not status.finished:
            return status
        self.task = None
        self._finishing = task.folder  # its folder is not an unfinished job's, even before it is tidied
        try:
            self._finish(task, status)
        finally:
            self._finishing = None
        return status

    def _finish(self, task: _Task, status: JobStatus) -> None:
        if status.state == DONE:
            try:
                task.on_done(status.result)
            except CimisError as exc:
                status.state, status.message = ERROR, exc.one_line()
                self.outcome.message = status.message
            except Exception as exc:  # a bug in a completion handler still ends in the status line
                (task.folder / "import-error.log").write_text(traceback.format_exc(), encoding="utf-8")
                status.state = ERROR
                status.message = (f"importing the {task.kind} result failed ({type(exc).__name__}: {exc}); "
                                  f"this is a bug, details in {task.folder / 'import-error.log'}")
                self.outcome.message = status.message
            if status.state == DONE:
                self._tidy(task)
        else:
            self.outcome.message = status.message
            if status.state == CANCELLED and task.kind == "learn":
                self.resumable = task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.process.cancel()

    @property
    def can_resume(self) -> bool:
        return not self.busy and self.resumable is not None

    def scene_closing(self) -> None:
        """The scene is about to close: a running Segment is cancelled, since its result has no volume left
        to go on. A Learn (or Train, Import) goes on: its result is a model version, not scene content."""
        if self.task is not None and self.task.kind == "segment":
            self.cancel()

    def shutdown(self) -> None:
        """Slicer is closing: the worker's cancel file first, then its whole process tree (the real Python
        behind the PythonSlicer launcher too); the job publishes nothing. Then the job folders go (copies of
        the patient's images, checkpoints, logs naming the volumes): Resume lives only in this session's
        memory, so after Slicer closes nothing could use them."""
        if self.task is not None:
            self.task.process.shutdown()
            self.task = None
        self._remove_job_folders()

    # ---------------------------------------------------------------------------------------- helpers
    def _refuse_if_busy(self) -> None:
        if self.busy:
            raise CimisError("a job is already running", "wait for it to finish, or cancel it")

    def _tidy(self, task: _Task) -> None:
        """A job whose result is in the scene keeps only its event log, result and worker log (a few kB):
        the inputs are a copy of the patient's images, the outputs are imported."""
        (task.folder / "events.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in task.process.events), encoding="utf-8")
        if self.keep_job_folders:
            return
        result = task.folder / "output" / "result.json"
        if result.is_file():
            shutil.copyfile(result, task.folder / "result.json")
        for name in ("inputs", "output", "job.json"):
            path = task.folder / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()

    def _remove_job_folders(self) -> None:
        """The module opens, a new job starts, or Slicer closes: every job folder of ours goes (a cancelled or failed job's
        images and checkpoints, a finished job's logs, and what an earlier session that crashed or was
        killed left behind), except those of another running Slicer and the one whose result is being
        imported. Nothing else in the jobs folder is touched."""
        if self.keep_job_folders or not self.jobs_dir.is_dir():
            return
        self.resumable = None
        try:
            folders = list(self.jobs_dir.iterdir())
        except OSError:
            return  # an unreadable jobs folder: the job's own folder creation then says what is wrong
        for folder in folders:
            if folder != self._finishing and _is_job_folder(folder) and not _owned_by_another_slicer(folder):
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _add_budget(job: dict, settings: JobSettings) -> None:
        budget = {k: getattr(settings, k) for k in ("iterations", "batch_size") if getattr(settings, k) is not None}
        if budget:
            job["budget"] = budget

    def _in_scene(self, node) -> bool:
        """Whether the node is still in this workflow's scene (a closed scene removes its nodes)."""
        return node is not None and node.GetScene() is self.context.scene

    def _worker_env(self) -> dict | None:
        return self.env

    @contextlib.contextmanager
    def _new_job(self, kind: str) -> Iterator[tuple[Path, str]]:
        """A new job folder, owner-only, for the block that writes the job's inputs and starts its worker.
        If the block fails (a full disk on the second CT, a worker that cannot start), the folder, which
        may already hold some of the patient's images, is removed and the error is one line."""
        self._remove_job_folders()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        job_id = f"{kind}-{stamp}-{uuid.uuid4().hex[:6]}"
        folder = self.jobs_dir / job_id
        try:
            if not self.jobs_dir.is_dir():
                self.jobs_dir.mkdir(parents=True)
                _owner_only(self.jobs_dir)
            folder.mkdir()
        except OSError as exc:
            raise CimisError(f"cannot create the job folder {folder}: {exc.strerror or exc}",
                             "choose a writable folder for jobs") from None
        try:
            _owner_only(folder)  # the copies inside are not readable by other users of a shared temp folder
            (folder / OWNER_FILE).write_text(str(os.getpid()), encoding="utf-8")
            yield folder, job_id
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError):
                raise CimisError(f"cannot write the job's inputs to {folder}: {exc.strerror or exc}",
                                 "check that the folder is writable and the disk not full") from None
            raise

    def _job_header(self, kind: str, job_id: str, folder: Path, settings: JobSettings) -> dict:
        job = {"format": JOB_FORMAT, "kind": kind, "id": job_id, "registry": str(self.registry_path),
               "output": str(folder / "output"), "device": settings.device}
        if settings.threads is not None:
            job["threads"] = settings.threads
        return job

    def _start(self, kind: str, folder: Path, job: dict, on_done, fresh_outcome: bool = True) -> None:
        job_file = folder / "job.json"
        job_file.write_text(json.dumps(job, indent=1), encoding="utf-8")
        process = WorkerProcess(job_file, Path(job["output"]) / "cancel", folder, self.python, self._worker_env())
        if fresh_outcome:
            self.outcome = Outcome()
        self.task = _Task(kind, folder, process, on_done)


def _is_job_folder(path: Path) -> bool:
    """A folder this module wrote: a job id as its name (``segment-20250101-120000-0a1b2c``) and the owner
    file or job file it writes first. A link is never one (its target may be anywhere)."""
    try:
        return (JOB_FOLDER_NAME.fullmatch(path.name) is not None and not path.is_symlink() and path.is_dir()
                and ((path / OWNER_FILE).is_file() or (path / "job.json").is_file()))
    except OSError:  # not ours to read, so not ours to remove
        return False


def _owner_only(folder: Path) -> None:
    """rwx for the owner only (``mkdir``'s mode is masked by the umask, so it is set afterwards)."""
    os.chmod(folder, stat.S_IRWXU)


def _owned_by_another_slicer(folder: Path) -> bool:
    """Whether the job folder belongs to another running Slicer (two Slicers share the temporary folder)."""
    from cimis.worker import process_alive

    try:
        owner = int((folder / OWNER_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return False
    return owner != os.getpid() and process_alive(owner)


def _log_line(event: dict) -> str:
    """One line of the log panel for a worker event worth showing (warnings, stages, retries, the end)."""
    kind = event.get("event")
    if kind == "warning":
        return f"warning: {event.get('message', '')}"
    if kind == "oom":
        return f"warning: {event.get('message', '')}"
    if kind == "stage":
        return f"{event.get('stage')}"
    if kind == "device":
        return f"device: {event.get('device')}" + (f" ({event['gpu']})" if event.get("gpu") else "")
    if kind == "error":
        return f"error: {event.get('message', '')}"
    if kind == "cancelled":
        return f"cancelled ({event.get('reason', '')})"
    if kind == "done":
        return "done" + (f": {event['version']}" if event.get("version") else "")
    return ""


def _safe(name: str) -> str:
    """A volume name as a job case id: letters, digits, '.', '_', '-'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return text[:60] or "volume"
