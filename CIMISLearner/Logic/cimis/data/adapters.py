"""Manifests from the on-disk layouts of the public datasets (BTCV, WORD, the Decathlon, the TotalSegmentator example).

Adapters look only at file names and JSON files; they never open a volume, so building a manifest for a
large dataset is instant. Unlabelled images are allowed only where a layout has them legitimately (test
images); any other image without its label, or label without its image, is an error naming the file.
"""

from __future__ import annotations

import inspect
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from cimis.data.classes import ClassInfo, ClassSet, btcv_classes, word_classes
from cimis.data.io import PathLike
from cimis.data.manifest import Case, Manifest, read_json
from cimis.errors import CimisError

# The 12 BTCV cases TransUNet (Chen et al. 2021) tests on; most BTCV papers since report on this split.
TRANSUNET_TEST_IDS = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")

# TotalSegmentator label value -> BTCV class value, per version (README of the example; unlisted values -> 0).
TOTALSEG_TO_BTCV: dict[str, dict[int, int]] = {
    "v2": {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13},
    "v1": {1: 1, 2: 2, 3: 3, 4: 4, 42: 5, 5: 6, 6: 7, 7: 8, 8: 9, 9: 10, 10: 11, 11: 12, 12: 13},
}
TOTALSEG_CT = "example_ct.nii.gz"
TOTALSEG_CASE_ID = "totalseg_example"

UNLABELLED_SPLIT = "unlabelled"
DEFAULT_SEED = 0
DEFAULT_FRACTION = 0.2

_NIFTI = re.compile(r"^(?P<stem>[^.].*?)\.nii(\.gz)?$")  # skips hidden files such as macOS "._x.nii.gz"


# --------------------------------------------------------------------------------------------- helpers


def _nifti_stem(name: str) -> str | None:
    match = _NIFTI.match(name)
    return match.group("stem") if match else None


def _case_id(path: Path) -> str:
    """A case id from a file name: the name without its .nii/.nii.gz extension."""
    return _nifti_stem(path.name) or path.stem


def _nifti_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """The NIfTI files directly in ``folder`` whose names start with ``prefix``, by name without extension
    and prefix."""
    files = {}
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path.name)
        if stem and stem.startswith(prefix) and path.is_file():
            files[stem[len(prefix):]] = path
    return files


def _pair(
    images: dict[str, Path], labels: dict[str, Path], labels_required: bool = True
) -> list[tuple[str, Path, Path | None]]:
    """Match images to labels by key; a label without image is always an error, an image without label
    only when ``labels_required``."""
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise CimisError(f"label {labels[orphans[0]]} has no matching image", "remove it or add its image")
    pairs = []
    for key in sorted(images):
        if key not in labels and labels_required:
            raise CimisError(f"image {images[key]} has no matching label", "add its label map or remove the image")
        pairs.append((key, images[key], labels.get(key)))
    return pairs


def _carve(ids: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (kept, carved) with a seeded ~``fraction`` carved.

    A positive fraction of two or more ids carves at least one and keeps at least one.
    """
    ids = sorted(ids)
    n = round(fraction * len(ids))
    if fraction > 0 and len(ids) >= 2:
        n = min(max(n, 1), len(ids) - 1)
    carved = set(random.Random(seed).sample(ids, n))
    return [i for i in ids if i not in carved], sorted(carved)


def _listed_file(root: Path, entry: Any, key: str, source: Path) -> Path:
    """The existing file a dataset JSON entry points at (``entry`` is a path string or a dict holding ``key``)."""
    text = entry.get(key) if isinstance(entry, dict) else entry
    if not isinstance(text, str) or not text:
        raise CimisError(f"{source}: entry {entry!r} has no {key!r} path")
    path = Path(os.path.normpath(root / text))
    if not path.is_file():
        raise CimisError(f"{path} listed in {source} does not exist", "check that the dataset is completely extracted")
    return path


def _listed_files(root: Path, data: dict, list_key: str, key: str, source: Path) -> list[Path]:
    """The existing files of the optional list ``data[list_key]`` (entries: paths or dicts holding ``key``)."""
    entries = data.get(list_key, [])
    if not isinstance(entries, list):
        raise CimisError(f"{source}: {list_key!r} must be a list")
    return [_listed_file(root, e, key, source) for e in entries]


def _unique_cases(cases: list[Case], source: Path) -> list[Case]:
    seen: dict[str, Path] = {}
    for c in cases:
        if c.id in seen:
            raise CimisError(f"{source}: {seen[c.id]} and {c.image} give the same case id {c.id!r}")
        seen[c.id] = c.image
    return cases


def _root(root: PathLike) -> Path:
    path = Path(os.path.abspath(Path(root).expanduser()))
    if not path.is_dir():
        raise CimisError(f"dataset folder {path} does not exist", "check the path")
    return path


# --------------------------------------------------------------------------------------------- BTCV


def from_btcv(root: PathLike, seed: int = DEFAULT_SEED, val_fraction: float = DEFAULT_FRACTION) -> Manifest:
    """BTCV (Synapse multi-organ abdominal CT), in the Synapse or the MONAI ``dataset_0.json`` layout.

    Synapse: ``RawData/Training/img/img0001.nii.gz`` and ``RawData/Training/label/label0001.nii.gz``;
    ``root`` may be the dataset folder, ``RawData`` or ``Training``. Case ids are the numbers ("0001").
    The TransUNet cases present form ``test``, the others ``train``, with a seeded ~20% of them as ``val``;
    ``RawData/Testing/img`` (no labels) becomes split ``unlabelled``.

    MONAI: ``dataset_0.json`` with ``training`` and ``validation`` lists of {image, label}; ``validation``
    becomes ``test``, ``val`` is carved from ``training``, and its optional ``test`` list is ``unlabelled``.
    """
    root = _root(root)
    if (root / "dataset_0.json").is_file():
        return _btcv_monai(root, seed, val_fraction)
    training = _btcv_training_folder(root)
    if training is None:
        raise CimisError(
            f"{root} is not a BTCV folder: found neither RawData/Training/img + label nor dataset_0.json",
            "point at the folder holding RawData (or at RawData or Training itself)",
        )
    images, labels = _nifti_files(training / "img", "img"), _nifti_files(training / "label", "label")
    if not images:
        raise CimisError(f"{training / 'img'} holds no imgNNNN.nii.gz files", "check that the dataset is extracted")
    cases = [Case(i, img, lab) for i, img, lab in _pair(images, labels)]
    test = [i for i in TRANSUNET_TEST_IDS if i in images]
    train, val = _carve(set(images) - set(test), val_fraction, seed)
    splits = {"train": train, "val": val, "test": test}
    testing = training.parent / "Testing" / "img"
    if testing.is_dir():
        unlabelled = _nifti_files(testing, "img")
        cases += [Case(i, p) for i, p in sorted(unlabelled.items())]
        splits[UNLABELLED_SPLIT] = sorted(unlabelled)
    return Manifest("btcv", btcv_classes(), _unique_cases(cases, training.parent), splits, root)


def _btcv_training_folder(root: Path) -> Path | None:
    """The Synapse ``Training`` folder (holding ``img`` and ``label``) from the dataset, RawData or Training folder."""
    for candidate in (root / "RawData" / "Training", root / "Training", root):
        if (candidate / "img").is_dir() and (candidate / "label").is_dir():
            return candidate
    return None


def _btcv_id(path: Path) -> str:
    """"img0001" -> "0001", as in the Synapse layout; other names keep their stem."""
    stem = _case_id(path)
    match = re.fullmatch(r"img(\d+)", stem)
    return match.group(1) if match else stem


def _btcv_monai(root: Path, seed: int, val_fraction: float) -> Manifest:
    source = root / "dataset_0.json"
    data = read_json(source, "dataset description")
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise CimisError(f"{source} has no 'training' list", "expected MONAI's BTCV dataset_0.json")

    def labelled(key: str) -> list[Case]:
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise CimisError(f"{source}: {key!r} must be a list of {{image, label}} objects")
        out = []
        for e in entries:
            image = _listed_file(root, e, "image", source)
            out.append(Case(_btcv_id(image), image, _listed_file(root, e, "label", source)))
        return out

    training, validation = labelled("training"), labelled("validation")
    unlabelled = [Case(_btcv_id(p), p) for p in _listed_files(root, data, "test", "image", source)]
    train, val = _carve([c.id for c in training], val_fraction, seed)
    splits = {"train": train, "val": val, "test": [c.id for c in validation]}
    if unlabelled:
        splits[UNLABELLED_SPLIT] = [c.id for c in unlabelled]
    return Manifest("btcv", btcv_classes(), _unique_cases(training + validation + unlabelled, source), splits, root)


# --------------------------------------------------------------------------------------------- WORD


def from_word(root: PathLike) -> Manifest:
    """WORD: ``imagesTr/labelsTr`` -> train, ``imagesVal/labelsVal`` -> val, ``imagesTs`` (+ ``labelsTs``) -> test.

    Images and labels are matched by file name; case ids are the names without extension.
    """
    root = _root(root)
    cases: list[Case] = []
    splits: dict[str, list[str]] = {}
    for suffix, split in (("Tr", "train"), ("Val", "val"), ("Ts", "test")):
        images_dir, labels_dir = root / f"images{suffix}", root / f"labels{suffix}"
        if not images_dir.is_dir():
            if suffix == "Ts":
                splits[split] = []
                continue
            raise CimisError(
                f"{root} is not a WORD folder: {images_dir.name} is missing", "point at the folder holding imagesTr"
            )
        if not labels_dir.is_dir() and suffix != "Ts":  # WORD's test labels are released separately
            raise CimisError(f"{labels_dir} is missing", f"WORD needs labels for images{suffix}")
        labels = _nifti_files(labels_dir) if labels_dir.is_dir() else {}
        pairs = _pair(_nifti_files(images_dir), labels, labels_required=labels_dir.is_dir())
        cases += [Case(i, img, lab) for i, img, lab in pairs]
        splits[split] = [i for i, _, _ in pairs]
    return Manifest("word", word_classes(), _unique_cases(cases, root), splits, root)


# --------------------------------------------------------------------------------------------- Decathlon


def from_decathlon(
    root: PathLike,
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_FRACTION,
    val_fraction: float = DEFAULT_FRACTION,
) -> Manifest:
    """A Medical Segmentation Decathlon task folder with its ``dataset.json``.

    Classes come from its ``labels`` (background "0" skipped). MSD's test images have no labels, so a seeded
    ~20% of the training cases is held out as ``test``, ~20% of the rest is ``val``, and MSD's own test
    images form the split ``unlabelled``.
    """
    root = _root(root)
    source = root / "dataset.json"
    if not source.is_file():
        raise CimisError(
            f"{root} is not a Decathlon task folder: dataset.json is missing", "point at e.g. Task03_Liver"
        )
    data = read_json(source, "dataset description")
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise CimisError(f"{source} has no 'training' list", "expected a Medical Segmentation Decathlon dataset.json")
    classes = _decathlon_classes(data.get("labels"), source)
    labelled = []
    for e in data["training"]:
        image = _listed_file(root, e, "image", source)
        labelled.append(Case(_case_id(image), image, _listed_file(root, e, "label", source)))
    unlabelled = [Case(_case_id(p), p) for p in _listed_files(root, data, "test", "image", source)]
    rest, test = _carve([c.id for c in labelled], test_fraction, seed)
    train, val = _carve(rest, val_fraction, seed)
    splits = {"train": train, "val": val, "test": test, UNLABELLED_SPLIT: [c.id for c in unlabelled]}
    name = str(data.get("name") or root.name)
    return Manifest(name, classes, _unique_cases(labelled + unlabelled, source), splits, root)


def _decathlon_classes(labels: Any, source: Path) -> ClassSet:
    """Classes from MSD ``{"0": "background", "1": "liver"}`` (or nnU-Net v2 ``{"background": 0, "liver": 1}``)."""
    if not isinstance(labels, dict) or not labels:
        raise CimisError(
            f"{source} has no 'labels' object", 'expected e.g. "labels": {"0": "background", "1": "liver"}'
        )
    try:
        if all(isinstance(v, str) for v in labels.values()):
            pairs = [(int(k), v) for k, v in labels.items()]
        else:
            pairs = [(int(v), str(k)) for k, v in labels.items()]
    except (TypeError, ValueError):
        raise CimisError(f"{source}: 'labels' must map integer values to names, got {labels}") from None
    # No colour given: ClassSet assigns palette colours.
    infos = [ClassInfo(name, value, None) for value, name in sorted(pairs) if value != 0]  # type: ignore[arg-type]
    return ClassSet(infos)


# --------------------------------------------------------------------------------------------- TotalSegmentator


def from_totalseg_example(folder: PathLike, version: str = "v2") -> Manifest:
    """The real CT of ``shared/data/totalseg_example`` with its TotalSegmentator labels mapped to BTCV classes.

    One case, ``totalseg_example``, in split ``test``. The labels are a model's output, not manual ground
    truth (see the folder's README); the manifest name says so.
    """
    folder = _root(folder)
    if version not in TOTALSEG_TO_BTCV:
        raise CimisError(
            f"unknown TotalSegmentator label version {version!r}", f"use one of {sorted(TOTALSEG_TO_BTCV)}"
        )
    image, label = folder / TOTALSEG_CT, folder / f"example_seg_total_{version}.nii.gz"
    for path in (image, label):
        if not path.is_file():
            raise CimisError(f"{path} is missing", f"{folder} should hold the TotalSegmentator example files")
    case = Case(TOTALSEG_CASE_ID, image, label, dict(TOTALSEG_TO_BTCV[version]))
    name = f"totalseg_example (TotalSegmentator {version} labels mapped to BTCV; model output, not manual ground truth)"
    return Manifest(name, btcv_classes(), [case], {"train": [], "val": [], "test": [TOTALSEG_CASE_ID]}, folder)


# --------------------------------------------------------------------------------------------- dispatch

ADAPTERS: dict[str, Callable[..., Manifest]] = {
    "btcv": from_btcv,
    "word": from_word,
    "decathlon": from_decathlon,
    "totalseg": from_totalseg_example,
}

_LAYOUTS = (
    "btcv (RawData/Training/img + label, or dataset_0.json)",
    "word (imagesTr, labelsTr, imagesVal, labelsVal)",
    "decathlon (dataset.json with imagesTr, labelsTr)",
    "totalseg (example_ct.nii.gz + example_seg_total_v2.nii.gz)",
)


def build_manifest(kind: str, root: PathLike, **kw: Any) -> Manifest:
    """The manifest of dataset ``kind`` ("btcv", "word", "decathlon" or "totalseg") at ``root``.

    ``kw`` are passed to the adapter (e.g. ``seed`` or ``version``).
    """
    adapter = ADAPTERS.get(kind.lower())
    if adapter is None:
        raise CimisError(f"unknown dataset layout {kind!r}", f"known layouts: {', '.join(ADAPTERS)}")
    try:
        inspect.signature(adapter).bind(root, **kw)
    except TypeError as exc:
        raise CimisError(
            f"bad option for the {kind} adapter: {exc}", f"it takes {inspect.signature(adapter)}"
        ) from None
    return adapter(root, **kw)


def detect_layout(root: PathLike) -> str:
    """Guess which dataset layout ``root`` holds, from the names on disk; the key for :func:`build_manifest`."""
    root = _root(root)
    if (root / "dataset_0.json").is_file() or _btcv_training_folder(root) is not None:
        return "btcv"
    if all((root / d).is_dir() for d in ("imagesTr", "labelsTr", "imagesVal", "labelsVal")):
        return "word"
    if (root / "dataset.json").is_file():
        return "decathlon"
    if (root / TOTALSEG_CT).is_file() and any(
        (root / f"example_seg_total_{v}.nii.gz").is_file() for v in TOTALSEG_TO_BTCV
    ):
        return "totalseg"
    raise CimisError(f"{root} matches no known dataset layout", f"known layouts: {'; '.join(_LAYOUTS)}")
