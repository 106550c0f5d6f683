"""Job files (``cimis-job/1``): one train, learn, segment or import job for ``cimis worker``, parsed and checked.

A job file is a JSON object (docs/worker-protocol.md has the full schema)::

    {"format": "cimis-job/1", "kind": "learn", "id": "add-pancreas",
     "registry": "models", "output": "jobs/add-pancreas", "device": "auto",
     "budget": {"iterations": 300, "batch_size": 2},
     "data": {"classes": [{"name": "pancreas", "value": 11}],
              "cases": [{"image": "ct1.nii.gz", "label": "pancreas1.nii.gz"}]},
     "learn": {"strategy": "pgcd-dapd"}}

Relative paths are relative to the job file's folder. Parsing refuses unknown keys (with a "did you mean"),
wrong types and missing files; :func:`check_training_data` then reads every case and refuses label maps on
another grid than their image, with values outside the classes, or without a voxel of any class to learn.
Everything here is cheap (JSON, SimpleITK headers and label maps; no torch), so a bad job fails in well
under a second and before the worker writes anything.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from cimis.data.classes import ClassSet
from cimis.data.io import check_id_as_file_name
from cimis.data.manifest import Case, Manifest, check_labels_contain, load_case
from cimis.errors import CimisError

JOB_FORMAT = "cimis-job/1"
KINDS = ("train", "learn", "segment", "import")
SPLITS = ("train", "val")
SEGMENT_FORMATS = ("nii.gz", "nrrd", "mha")
DEFAULT_CANCEL_FILE = "cancel"

# Keys allowed at each level; anything else is a typo or a newer format, and is refused rather than ignored.
_TOP_KEYS = {
    "common": ("format", "kind", "id", "registry", "output", "device", "threads", "cancel_file", "data"),
    "train": ("budget", "train", "nproc", "devices"),
    "learn": ("budget", "learn", "nproc", "devices"),
    "segment": ("segment",),
    "import": ("import",),
}
_BUDGET_KEYS = ("iterations", "batch_size", "checkpoint_every", "val_every")
_TRAIN_KEYS = ("network", "preprocess", "learning_rate", "seed", "augment", "amp", "activate", "note")
_LEARN_KEYS = ("base_version", "strategy", "options", "learning_rate", "seed", "augment", "amp", "activate", "note")
_SEGMENT_KEYS = ("version", "format")
_TRAINING_DATA_KEYS = ("manifest", "classes", "cases")
_CASE_KEYS = ("id", "image", "label", "split", "label_map")
_SEGMENT_DATA_KEYS = ("images",)
_IMAGE_KEYS = ("id", "image")
_IMPORT_KEYS = ("source", "classes", "fold", "spacing", "window", "patch_size", "activate", "note")
_IMPORT_DATA_KEYS = ("volumes",)


@dataclass(frozen=True)
class Budget:
    """How much training a job may do; None means the engine's default (for learn: step 0's settings)."""

    iterations: int | None = None
    batch_size: int | None = None
    checkpoint_every: int | None = None
    val_every: int | None = None


@dataclass(frozen=True)
class ImageInput:
    """A volume to segment and the id its label map is named after (``OUTPUT/labels/ID.nii.gz``)."""

    id: str
    image: Path


@dataclass
class Job:
    """A parsed, checked job file.

    Attributes:
        source: the job file.
        kind: ``train``, ``learn``, ``segment`` or ``import``.
        id: names the job in events and in the registry's version summaries.
        registry: the model registry folder (created by a train job when missing).
        output: the job's own folder: checkpoints, label maps, result.json.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch (None: torch's default, one per core); fewer keep the machine responsive.
        cancel_file: a new file inside ``output`` whose appearance cancels the job (default ``OUTPUT/cancel``).
        budget: training budget (train and learn).
        settings: the kind's own section (``train``, ``learn``, ``segment`` or ``import``), checked; for
            ``import`` also ``volumes``, the unlabelled CTs of ``data.volumes`` (absolute paths).
        manifest: the training data (train and learn), as a manifest with ``train`` and ``val`` splits.
        class_names: train: the classes to learn; learn: the new classes (None: the manifest decides).
        new_classes: learn with listed cases: the new classes with their label values.
        images: segment: the volumes to segment.
        nproc: train and learn: the number of data-parallel processes (ranks); rank 0 is the worker itself.
        devices: train and learn: the CUDA device index of each rank (None: ranks 0..nproc-1, or the CPU).
    """

    source: Path
    kind: str
    id: str
    registry: Path
    output: Path
    device: str = "auto"
    threads: int | None = None
    cancel_file: Path | None = None
    budget: Budget = field(default_factory=Budget)
    settings: dict = field(default_factory=dict)
    manifest: Manifest | None = None
    class_names: list[str] | None = None
    new_classes: ClassSet | None = None
    images: list[ImageInput] = field(default_factory=list)
    nproc: int = 1
    devices: list[int] | None = None

    def to_json(self) -> dict:
        """What the worker records about the job (job-state.json, version summaries)."""
        recorded = {"id": self.id, "kind": self.kind, "file": str(self.source), "output": str(self.output),
                    "registry": str(self.registry), "device": self.device}
        if self.nproc > 1:
            recorded.update(nproc=self.nproc, devices=self.devices)
        return recorded


# ------------------------------------------------------------------------------------------- parsing
def load_job(path: str | Path) -> Job:
    """Read and check a job file; every problem is a :class:`CimisError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CimisError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CimisError(f"cannot read job file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CimisError(
            f"job file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax (a trailing comma or a missing quote is the usual cause)",
        ) from None
    except ValueError:  # json refuses integers of more than 4300 digits with a ValueError
        raise CimisError(f"job file {path} holds a number too long to be a job setting",
                         "write a job file as docs/worker-protocol.md describes") from None
    except RecursionError:
        raise CimisError(f"job file {path} is nested too deeply to be a job file",
                         "write a job file as docs/worker-protocol.md describes") from None
    try:
        return parse_job(data, path.parent.absolute(), path.absolute())
    except CimisError as exc:
        raise CimisError(f"job file {path}: {exc.message}", exc.hint) from None


def parse_job(data: Any, base: Path, source: Path) -> Job:
    """Build a :class:`Job` from the JSON object of a job file; relative paths are resolved against ``base``."""
    _expect(data, dict, "the job file", "a JSON object")
    if data.get("format") != JOB_FORMAT:
        raise CimisError(f"'format' is {data.get('format')!r}, expected {JOB_FORMAT!r}",
                         f'start the job file with "format": "{JOB_FORMAT}"')
    kind = data.get("kind")
    if kind not in KINDS:
        raise CimisError(f"'kind' is {kind!r}", f"use one of {', '.join(KINDS)}")
    for key in ("nproc", "devices"):
        if key in data and kind not in ("train", "learn"):
            raise CimisError(f"{key!r} is for train and learn jobs, not {kind} jobs", f"leave {key!r} out")
    _refuse_unknown(data, _TOP_KEYS["common"] + _TOP_KEYS[kind], "the job")
    for key in ("registry", "output"):
        if key not in data:
            raise CimisError(f"the job has no {key!r}", f"add \"{key}\": \"path/to/folder\"")
    registry = _path(data["registry"], base, "registry")
    output = _path(data["output"], base, "output")
    if _inside(registry, output) or _inside(output, registry):
        raise CimisError(f"the output folder {output} and the registry {registry} overlap",
                         "give the job an output folder outside the registry")
    job_id = data.get("id", output.name)
    _expect(job_id, str, "'id'", "a string")
    check_id_as_file_name(job_id, "'id'")
    device = data.get("device", "auto")
    _expect(device, str, "'device'", "a string")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device.lower()):
        raise CimisError(f"'device' is {device!r}", "use auto, cpu, cuda or cuda:N")
    threads = _positive_int(data["threads"], "'threads'") if data.get("threads") is not None else None
    cancel = _cancel_file(data["cancel_file"], base, output) if "cancel_file" in data else output / DEFAULT_CANCEL_FILE
    if _holds_something(cancel):
        # The worker deletes the cancel file it obeys: it must be a new name, never someone's file. An empty
        # file is a cancel request that arrived before the job started, and cancels it at once.
        raise CimisError(f"the cancel file {cancel} already exists and is not an empty cancel request",
                         "give cancel_file a new name inside the output folder")
    job = Job(source=source, kind=kind, id=job_id, registry=registry, output=output, device=device.lower(),
              threads=threads, cancel_file=cancel)

    if kind == "import":  # the input is a model folder; volumes for its prototypes are optional
        job.settings = _import_settings(data.get("import"), data.get("data", {}), base)
        return job
    if "data" not in data:
        raise CimisError("the job has no 'data'", "add the volumes to learn from or to segment under \"data\"")
    section = data.get(kind, {})
    _expect(section, dict, f"'{kind}'", "an object")
    if kind == "segment":
        job.settings = _segment_settings(section)
        job.images = _images(data["data"], base)
    else:
        job.nproc, job.devices = _ranks(data, job.device)
        job.budget = _budget(data.get("budget", {}))
        job.settings = _train_settings(section) if kind == "train" else _learn_settings(section)
        _training_data(job, data["data"], base)
    return job


def _ranks(data: dict, device: str) -> tuple[int, list[int] | None]:
    """``nproc`` and ``devices`` of a train or learn job (their presence on this machine is checked by the
    worker, which imports torch): the number of ranks and each one's GPU."""
    nproc = _positive_int(data["nproc"], "'nproc'") if "nproc" in data else None
    devices = data.get("devices")
    if devices is None:
        if (nproc or 1) > 1 and device.startswith("cuda:"):
            raise CimisError(f"'nproc' {nproc} starts one process per GPU from GPU 0, and 'device' is {device!r}",
                             "choose the GPUs with 'devices' (e.g. [1, 2]) and leave 'device' out")
        return nproc or 1, None
    if not isinstance(devices, list) or not devices or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
        raise CimisError(f"'devices' must be a non-empty list of GPU indices like [0, 1], got {json.dumps(devices)[:80]}")
    if len(set(devices)) != len(devices):
        raise CimisError(f"'devices' lists a GPU twice ({devices})", "list each GPU once: one process per GPU")
    if device == "cpu" or device.startswith("cuda:"):
        raise CimisError(f"'devices' lists GPUs, and 'device' is {device!r}",
                         "leave 'device' out (or auto or cuda) with 'devices'; on the CPU use 'nproc'")
    if nproc is not None and nproc != len(devices):
        raise CimisError(f"'nproc' is {nproc} and 'devices' lists {len(devices)} GPUs",
                         "give one of them ('devices' alone starts one process per GPU)")
    return len(devices), list(devices)


def _budget(d: Any) -> Budget:
    _expect(d, dict, "'budget'", "an object")
    _refuse_unknown(d, _BUDGET_KEYS, "'budget'")
    values = {k: _positive_int(d[k], f"budget.{k}") for k in _BUDGET_KEYS if k in d}
    return Budget(**values)


def _train_settings(d: dict) -> dict:
    _refuse_unknown(d, _TRAIN_KEYS, "'train'")
    settings = {"network": "small", "preprocess": {}, "activate": True, "note": ""}
    settings.update(_common_training_settings(d, "train"))
    if "network" in d:
        network = d["network"]
        if not isinstance(network, (str, dict)):
            raise CimisError("train.network must be a preset name (small, dynunet) or an object of network settings")
        settings["network"] = network
    if "preprocess" in d:
        _expect(d["preprocess"], dict, "train.preprocess", "an object like {\"spacing\": [3, 3, 3], \"patch_size\": [64, 64, 64]}")
        settings["preprocess"] = dict(d["preprocess"])
    return settings


def _learn_settings(d: dict) -> dict:
    _refuse_unknown(d, _LEARN_KEYS, "'learn'")
    settings = {"base_version": None, "strategy": "pgcd-dapd", "options": {}, "activate": True, "note": ""}
    settings.update(_common_training_settings(d, "learn"))
    if "base_version" in d and d["base_version"] is not None:
        settings["base_version"] = _string(d["base_version"], "learn.base_version")
    if "strategy" in d:
        settings["strategy"] = _string(d["strategy"], "learn.strategy")
    if "options" in d:
        _expect(d["options"], dict, "learn.options", "an object of step options")
        settings["options"] = dict(d["options"])
    return settings


def _common_training_settings(d: dict, where: str) -> dict:
    out: dict[str, Any] = {}
    if "learning_rate" in d:
        rate = d["learning_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise CimisError(f"{where}.learning_rate must be a positive number, got {rate!r}")
        out["learning_rate"] = float(rate)
    if "seed" in d:
        seed = d["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CimisError(f"{where}.seed must be a non-negative integer, got {seed!r}")
        out["seed"] = seed
    for key in ("augment", "amp", "activate"):
        if key in d:
            _expect(d[key], bool, f"{where}.{key}", "true or false")
            out[key] = d[key]
    if "note" in d:
        out["note"] = _string(d["note"], f"{where}.note", allow_empty=True)
    return out


def _segment_settings(d: dict) -> dict:
    _refuse_unknown(d, _SEGMENT_KEYS, "'segment'")
    settings = {"version": None, "format": "nii.gz"}
    if d.get("version") is not None:
        settings["version"] = _string(d["version"], "segment.version")
    if "format" in d:
        fmt = _string(d["format"], "segment.format").lstrip(".")
        if fmt not in SEGMENT_FORMATS:
            raise CimisError(f"segment.format is {fmt!r}", f"use one of {', '.join(SEGMENT_FORMATS)}")
        settings["format"] = fmt
    return settings


def _import_settings(d: Any, data: Any, base: Path) -> dict:
    """The ``import`` section (a MONAI bundle or nnU-Net v2 folder and what to keep of it) and
    ``data.volumes``; the source itself is read by the job (cimis.model.import_command)."""
    if d is None:
        raise CimisError("the job has no 'import'", "add \"import\": {\"source\": \"path/to/model/folder\"}")
    _expect(d, dict, "'import'", "an object with \"source\"")
    _refuse_unknown(d, _IMPORT_KEYS, "'import'")
    if "source" not in d:
        raise CimisError("import has no 'source'", "give the MONAI bundle or nnU-Net model folder")
    settings: dict[str, Any] = {"source": _existing(d["source"], base, "import.source", "model folder"),
                                "classes": None, "fold": None, "spacing": None, "window": None, "patch_size": None,
                                "activate": None, "note": "", "volumes": []}
    if d.get("classes") is not None:
        names = d["classes"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise CimisError("import.classes must be a non-empty list of class names")
        settings["classes"] = [n.strip() for n in names]
    if d.get("fold") is not None:
        fold = d["fold"]
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise CimisError(f"import.fold must be a fold number (0 or more), got {json.dumps(fold)[:80]}")
        settings["fold"] = fold
    for key, count, positive in (("spacing", 3, True), ("window", 2, False), ("patch_size", 3, True)):
        value = d.get(key)
        if value is None:
            continue
        integers = key == "patch_size"
        if (not isinstance(value, list) or len(value) != count
                or not all(not isinstance(v, bool) and isinstance(v, int if integers else (int, float))
                           and math.isfinite(v) and (v > 0 or not positive) for v in value)):
            kind = "positive whole numbers" if integers else ("positive numbers" if positive else "numbers")
            raise CimisError(f"import.{key} must be a list of {count} {kind}, got {json.dumps(value)[:80]}")
        if key == "window" and not value[0] < value[1]:
            raise CimisError(f"import.window must be [low, high] with low < high, got {value}")
        settings[key] = [int(v) for v in value] if integers else [float(v) for v in value]
    if d.get("activate") is not None:
        _expect(d["activate"], bool, "import.activate", "true, false or null")
        settings["activate"] = d["activate"]
    if "note" in d:
        settings["note"] = _string(d["note"], "import.note", allow_empty=True)
    _expect(data, dict, "'data'", "an object with \"volumes\"")
    _refuse_unknown(data, _IMPORT_DATA_KEYS, "'data'")
    volumes = data.get("volumes", [])
    if not isinstance(volumes, list):
        raise CimisError("data.volumes must be a list of CT files or DICOM folders")
    settings["volumes"] = [_existing(v, base, f"data.volumes[{i}]", "volume") for i, v in enumerate(volumes)]
    return settings


def _images(d: Any, base: Path) -> list[ImageInput]:
    _expect(d, dict, "'data'", "an object with \"images\"")
    _refuse_unknown(d, _SEGMENT_DATA_KEYS, "'data'")
    entries = d.get("images")
    if not isinstance(entries, list) or not entries:
        raise CimisError("data.images must be a non-empty list of image paths (or {\"id\", \"image\"} objects)")
    images = []
    for i, entry in enumerate(entries):
        where = f"data.images[{i}]"
        if isinstance(entry, str):
            entry = {"image": entry}
        _expect(entry, dict, where, "a path or an object with \"image\"")
        _refuse_unknown(entry, _IMAGE_KEYS, where)
        if "image" not in entry:
            raise CimisError(f"{where} has no 'image'")
        image = _existing(entry["image"], base, f"{where}.image", "image")
        image_id = _case_id(entry.get("id", _stem(image)), f"{where}.id")
        images.append(ImageInput(image_id, image))
    _refuse_duplicate_ids([im.id for im in images], "data.images")
    return images


def _training_data(job: Job, d: Any, base: Path) -> None:
    """Fill ``job.manifest`` (and the class choice) from ``data``: a manifest file, or listed cases."""
    _expect(d, dict, "'data'", "an object with \"manifest\" or with \"classes\" and \"cases\"")
    _refuse_unknown(d, _TRAINING_DATA_KEYS, "'data'")
    if "manifest" in d:
        if "cases" in d:
            raise CimisError("data has both 'manifest' and 'cases'", "give one of them")
        path = _existing(d["manifest"], base, "data.manifest", "manifest")
        job.manifest = Manifest.load(path)
        if "val" not in job.manifest.splits:  # the trainer asks for both splits
            job.manifest.splits["val"] = []
        if "train" not in job.manifest.splits:
            raise CimisError(f"manifest {path} has no 'train' split", "list the training cases under splits.train")
        if "classes" in d:
            names = d["classes"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise CimisError("with a manifest, data.classes must be a non-empty list of class names")
            job.manifest.classes.subset(names)  # refuses names the manifest does not have
            job.class_names = [n.strip() for n in names]
        return

    if "classes" not in d or "cases" not in d:
        raise CimisError("data needs either 'manifest', or 'classes' and 'cases'",
                         "list the classes painted in the label maps, with their label values, and the cases")
    entries = d["classes"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CimisError("data.classes must be a non-empty list of {\"name\", \"value\", \"color\"} objects")
    for i, entry in enumerate(entries):
        _refuse_unknown(entry, ("name", "value", "color"), f"data.classes[{i}]")
    classes = ClassSet.from_json(entries)
    cases_json = d["cases"]
    if not isinstance(cases_json, list) or not cases_json:
        raise CimisError("data.cases must be a non-empty list of {\"image\", \"label\"} objects")
    cases, splits = [], {"train": [], "val": []}
    for i, entry in enumerate(cases_json):
        where = f"data.cases[{i}]"
        _expect(entry, dict, where, "an object with \"image\" and \"label\"")
        _refuse_unknown(entry, _CASE_KEYS, where)
        for key in ("image", "label"):
            if key not in entry:
                raise CimisError(f"{where} has no {key!r}", "every case needs an image and its label map")
        image = _existing(entry["image"], base, f"{where}.image", "image")
        label = _existing(entry["label"], base, f"{where}.label", "label map")
        case_id = _case_id(entry.get("id", _stem(image)), f"{where}.id")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise CimisError(f"{where}.split is {split!r}", "use train or val")
        label_map = entry.get("label_map")
        if label_map is not None:
            _expect(label_map, dict, f"{where}.label_map", "an object like {\"1\": 11}")
            try:
                label_map = {int(k): int(v) for k, v in label_map.items()}
            except (TypeError, ValueError):
                raise CimisError(f"{where}.label_map keys and values must be integers") from None
        cases.append(Case(case_id, image, label, label_map))
        splits[split].append(case_id)
    _refuse_duplicate_ids([c.id for c in cases], "data.cases")
    if not splits["train"]:
        raise CimisError("no case is in the train split", "leave 'split' out (it defaults to train) for at least one case")
    job.manifest = Manifest(job.id, classes, cases, splits, base)
    job.class_names = classes.names
    if job.kind == "learn":
        job.new_classes = classes


# --------------------------------------------------------------------------------------- data checks
def check_training_data(manifest: Manifest, learned: ClassSet) -> int:
    """Read every train and val case and check it; returns the number of cases checked.

    Each label map must lie on its image's grid, hold only the manifest's class values, and contain at
    least one voxel of a class in ``learned`` (the classes the job trains): a label map without one would
    teach nothing, and usually means the wrong file or forgotten painting.
    """
    cases = manifest.cases_in("train") + manifest.cases_in("val")
    for case in cases:
        if case.label is None:
            raise CimisError(f"case {case.id!r} has no label map", "every training case needs one")
        check_labels_contain([case], learned)
        load_case(case, manifest.classes)  # grid, integer values, known values, image finite and 3D
    return len(cases)


def resolve_new_classes(job: Job, old: ClassSet) -> ClassSet:
    """The classes a learn job adds to a model with classes ``old``; refuses names or values it already has.

    Listed cases bring their classes; with a manifest, the named classes or else every class the model lacks.
    """
    if job.new_classes is not None:
        new = job.new_classes
    elif job.class_names:
        new = job.manifest.classes.subset(job.class_names)
    else:
        known = {c.name.lower() for c in old}
        new = ClassSet([c for c in job.manifest.classes if c.name.lower() not in known])
        if not len(new):
            raise CimisError("the data has no class the model does not already know",
                             "name the new classes in data.classes and paint them in the label maps")
    old_names = {c.name.lower(): c.name for c in old}
    for c in new:
        if c.name.lower() in old_names:
            raise CimisError(f"the model already has a class named {old_names[c.name.lower()]!r}",
                             "give the new structure another name, or pick another model version")
    clash = sorted(set(new.values) & set(old.values))
    if clash:
        raise CimisError(f"label values {clash} of the new classes are already used by the model for "
                         f"{[c.name for c in old if c.value in clash]}",
                         "give the new classes other label values")
    return new


def check_segment_inputs(images: list[ImageInput]) -> None:
    """Refuse, from their headers only, inputs that are not 3D scalar volumes (a folder is a DICOM series
    and is checked when it is read)."""
    for item in images:
        if item.image.is_dir():
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(item.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise CimisError(f"{item.image} cannot be read as an image",
                             "use a NIfTI, NRRD or MHA file, or a folder holding a DICOM series") from None
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise CimisError(f"{item.image} is not a 3D scalar volume "
                             f"({reader.GetDimension()}D, {reader.GetNumberOfComponents()} values per voxel)",
                             "segment one 3D CT volume per image")


# --------------------------------------------------------------------------------------------- helpers
def _expect(value: Any, kind: type, what: str, described: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CimisError(f"{what} must be {described}, got {json.dumps(value)[:80]}")


def _refuse_unknown(d: dict, known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1) or [k for k in known if k.startswith(key) or key.startswith(k)]
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        raise CimisError(f"unknown key {key!r} in {where}", hint)


def _string(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise CimisError(f"{what} must be a {'' if allow_empty else 'non-empty '}string, got {json.dumps(value)[:80]}")
    return value.strip()


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CimisError(f"{what} must be a positive integer, got {json.dumps(value)[:80]}")
    return value


def _path(value: Any, base: Path, what: str) -> Path:
    text = _string(value, f"'{what}'")
    return (base / Path(text).expanduser()).absolute()


def _cancel_file(value: Any, base: Path, output: Path) -> Path:
    """``cancel_file``: a file name inside the output folder (the worker deletes it once obeyed, so it can
    never be one of the user's files elsewhere)."""
    path = _path(value, base, "cancel_file")
    if path == output or not _inside(path, output):
        raise CimisError(f"cancel_file {path} is not inside the output folder {output}",
                         "name a new file inside the output folder (e.g. OUTPUT/stop), or leave cancel_file out "
                         "(default OUTPUT/cancel)")
    return path


def _holds_something(path: Path) -> bool:
    """Whether ``path`` is anything but absent or an empty regular file (a folder, a link, a file with data)."""
    if path.is_symlink():
        return True
    if not path.exists():
        return False
    return not path.is_file() or path.stat().st_size > 0


def _existing(value: Any, base: Path, what: str, noun: str) -> Path:
    path = _path(value, base, what)
    if not path.exists():
        raise CimisError(f"the {noun} {path} ({what}) does not exist", "check the path; relative paths start at the job file's folder")
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _case_id(value: Any, what: str) -> str:
    return check_id_as_file_name(_string(value, what), what)


def _refuse_duplicate_ids(ids: list[str], where: str) -> None:
    seen = set()
    for i in ids:
        if i.lower() in seen:
            raise CimisError(f"{where} has the id {i!r} twice", "give each volume its own id")
        seen.add(i.lower())
