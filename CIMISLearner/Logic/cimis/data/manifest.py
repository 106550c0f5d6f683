"""The dataset manifest (``cimis-manifest/1``, docs/manifest.md): cases, classes and splits in one JSON file.

:class:`Manifest` loads, validates and saves the file; :func:`load_case` reads one case's image and label
and returns them checked, with the label holding class values on the image's grid.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassSet, label_dtype
from cimis.data.io import PathLike, check_id_as_file_name, copy_geometry, read_image, staged_output
from cimis.data.validation import (
    check_3d,
    check_finite,
    check_integer_labels,
    check_label_values,
    check_not_empty,
    check_same_geometry,
    label_values,
)
from cimis.errors import CimisError

FORMAT = "cimis-manifest/1"
TEST_SPLIT = "test"
# Splits that tune or train a model; a test case in one of them would leak into the evaluation.
_TUNING_SPLITS = ("train", "val")


@dataclass
class Case:
    """One image, its optional label map and the optional on-disk-value -> class-value map of that label."""

    id: str
    image: Path
    label: Path | None = None
    label_map: dict[int, int] | None = None


@dataclass
class Manifest:
    """A dataset: its classes, its cases and named splits of case ids.

    ``root`` is the folder relative paths were resolved against (the manifest file's folder after
    :meth:`load`). Constructing a manifest validates ids and splits.
    """

    name: str
    classes: ClassSet
    cases: list[Case]
    splits: dict[str, list[str]] = field(default_factory=dict)
    root: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        ids = [c.id for c in self.cases]
        for case_id in ids:  # ids name prediction files (cimis segment --manifest writes OUTPUT/ID.nii.gz)
            check_id_as_file_name(case_id, f"manifest {self.name!r}: case id")
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise CimisError(
                f"manifest {self.name!r} has duplicate case ids {duplicates}", "give every case its own id"
            )
        known = set(ids)
        for split, members in self.splits.items():
            unknown = [m for m in members if m not in known]
            if unknown:
                raise CimisError(
                    f"split {split!r} of manifest {self.name!r} names unknown cases {unknown[:10]}",
                    "every id in a split must be the id of a case",
                )
            if len(set(members)) != len(members):
                raise CimisError(f"split {split!r} of manifest {self.name!r} lists a case twice")
        tuning = {m for s in _TUNING_SPLITS for m in self.splits.get(s, [])}
        leaked = sorted(set(self.splits.get(TEST_SPLIT, [])) & tuning)
        if leaked:
            raise CimisError(
                f"manifest {self.name!r} has cases {leaked[:10]} both in 'test' and in 'train' or 'val'",
                "test cases are held out for evaluation; remove them from train and val",
            )
        for case in self.cases:
            if case.label_map:
                stray = sorted({v for v in case.label_map.values() if v != 0 and v not in set(self.classes.values)})
                if stray:
                    raise CimisError(
                        f"label_map of case {case.id!r} maps to {stray}, which are not class values",
                        f"map to 0 or to one of {self.classes.values}",
                    )

    # ------------------------------------------------------------------------------------------ queries

    def case(self, case_id: str) -> Case:
        """The case with id ``case_id``."""
        for c in self.cases:
            if c.id == case_id:
                return c
        known = ", ".join(c.id for c in self.cases[:10])
        raise CimisError(
            f"manifest {self.name!r} has no case {case_id!r}",
            f"known cases include {known}" if self.cases else "the manifest has no cases",
        )

    def cases_in(self, split: str) -> list[Case]:
        """The cases of ``split`` in the split's order (an empty split gives an empty list)."""
        if split not in self.splits:
            raise CimisError(
                f"manifest {self.name!r} has no split {split!r}",
                f"known splits: {', '.join(self.splits) or 'none'}",
            )
        by_id = {c.id: c for c in self.cases}
        return [by_id[i] for i in self.splits[split]]

    # ------------------------------------------------------------------------------------------ JSON

    def to_json(self, base: Path) -> dict[str, Any]:
        """The manifest as a JSON object, with paths under ``base`` written relative to it."""
        cases = []
        for c in self.cases:
            entry: dict[str, Any] = {"id": c.id, "image": _relative(c.image, base)}
            if c.label is not None:
                entry["label"] = _relative(c.label, base)
            if c.label_map is not None:
                entry["label_map"] = {str(k): int(v) for k, v in sorted(c.label_map.items())}
            cases.append(entry)
        return {
            "format": FORMAT,
            "name": self.name,
            "classes": self.classes.to_json(),
            "cases": cases,
            "splits": {k: list(v) for k, v in self.splits.items()},
        }

    @staticmethod
    def from_json(data: Any, root: Path, source: str) -> "Manifest":
        """Build a manifest from its JSON object, resolving relative paths against ``root``.

        ``source`` names where the JSON came from, for error messages.
        """
        try:
            if not isinstance(data, dict):
                raise CimisError("the top level must be a JSON object")
            if data.get("format") != FORMAT:
                raise CimisError(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
            name = data.get("name", Path(source).stem)
            if not isinstance(name, str):
                raise CimisError("'name' must be a string")
            classes = ClassSet.from_json(data.get("classes"))
            entries = data.get("cases")
            if not isinstance(entries, list):
                raise CimisError("'cases' must be a list of {id, image, label} objects")
            cases = [_case_from_json(e, root) for e in entries]
            splits = data.get("splits", {})
            if not isinstance(splits, dict) or not all(
                isinstance(v, list) and all(isinstance(i, str) for i in v) for v in splits.values()
            ):
                raise CimisError("'splits' must map split names to lists of case ids")
            return Manifest(name, classes, cases, {str(k): list(v) for k, v in splits.items()}, root)
        except CimisError as exc:
            raise CimisError(f"manifest {source}: {exc.message}", exc.hint) from None

    # ------------------------------------------------------------------------------------------ files

    @staticmethod
    def load(path: PathLike) -> "Manifest":
        """Read and validate a manifest file; relative paths in it are relative to its folder."""
        path = Path(path)
        data = read_json(path, "manifest", "create one with `cimis manifest`")
        return Manifest.from_json(data, _absolute(path.parent), str(path))

    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write the manifest to ``path``; paths under its folder are written relative to it. Returns ``path``."""
        path = Path(path)
        text = json.dumps(self.to_json(_absolute(path.parent)), indent=2) + "\n"
        with staged_output(path, overwrite) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path


def read_json(path: Path, what: str, missing_hint: str | None = None) -> Any:
    """The parsed JSON file ``path`` (a ``what``, e.g. "manifest"); syntax errors give their line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CimisError(f"{what} {path} does not exist", missing_hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CimisError(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CimisError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax (a trailing comma or a missing quote is the usual cause)",
        ) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise CimisError(f"{what} {path} holds a number too long to read ({str(exc)[:80]})") from None
    except RecursionError:
        raise CimisError(f"{what} {path} is nested too deeply") from None


def _case_from_json(entry: Any, root: Path) -> Case:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise CimisError(f"case entry {entry!r} needs a non-empty string 'id'")
    case_id = entry["id"]
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        raise CimisError(f"case {case_id!r} needs an 'image' path")
    label = entry.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        raise CimisError(f"case {case_id!r} has a 'label' that is not a path")
    label_map = entry.get("label_map")
    if label_map is not None:
        if not isinstance(label_map, dict):
            raise CimisError(f"case {case_id!r}: 'label_map' must be an object like {{\"5\": 6}}")
        try:
            label_map = {int(k): int(v) for k, v in label_map.items()}
        except (TypeError, ValueError):
            raise CimisError(
                f"case {case_id!r}: 'label_map' keys and values must be integers, got {entry['label_map']}"
            ) from None
        if any(k < 0 or v < 0 for k, v in label_map.items()):
            raise CimisError(f"case {case_id!r}: 'label_map' values must not be negative")
    return Case(case_id, _resolve(entry["image"], root), _resolve(label, root) if label else None, label_map)


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised, without resolving symbolic links (keeps the user's paths)."""
    return Path(os.path.abspath(path))


def _resolve(text: str, root: Path) -> Path:
    return _absolute(root / Path(text).expanduser())


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators, portable) when it lies under it, else absolute."""
    path = _absolute(path)
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- cases


def load_case(case: Case, classes: ClassSet) -> tuple[sitk.Image, sitk.Image | None]:
    """Read and check a case: the image, and its label holding class values on the image's grid.

    The label's on-disk values go through ``case.label_map`` when there is one (unlisted values become 0).
    The returned label is uint8 when every class value is below 256, else uint16.

    Raises:
        CimisError: a file is unreadable, not 3D, has NaN/inf voxels (image), is on another grid than the
            image, holds values outside the classes, or has no foreground (label).
    """
    image = read_image(case.image)
    check_3d(image, case.image)
    check_finite(image, case.image)
    if case.label is None:
        return image, None

    label = read_image(case.label)
    check_3d(label, case.label)
    check_same_geometry(image, label, case.image, case.label)
    values = sitk.GetArrayViewFromImage(label)
    check_integer_labels(values, case.label)
    if case.label_map is not None:
        values = apply_label_map(values, case.label_map)
    check_label_values(values, classes, case.label)
    check_not_empty(values, case.label)

    out = sitk.GetImageFromArray(np.asarray(values).astype(label_dtype(classes.values), copy=False))
    return image, copy_geometry(image, out)  # the image's exact grid, not the label's rounded copy


def apply_label_map(label_array: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """On-disk label values -> class values through ``label_map``; values it does not list become 0.

    ``label_array`` must hold non-negative integers (see ``check_integer_labels``).
    """
    label_array = np.asarray(label_array)
    present = label_values(label_array)
    dtype = label_dtype(label_map.values())
    targets = np.array([label_map.get(int(v), 0) for v in present.tolist()], dtype=dtype)
    top = int(present.max()) if present.size else 0
    if top <= 1 << 20:  # the usual case: a dense lookup table indexed by the value itself
        lut = np.zeros(top + 1, dtype=dtype)
        lut[present.astype(np.intp)] = targets
        index = label_array if label_array.dtype.kind in "ui" else label_array.astype(np.intp)
        return lut[index]
    return targets[np.searchsorted(present, label_array)]  # sparse huge values: look up their rank


def check_labels_contain(cases: list[Case], classes: ClassSet) -> None:
    """Refuse a label map without a voxel of any of ``classes``: a step could learn nothing from it, and it
    usually means a wrong file or forgotten painting. Reads only the label maps."""
    for case in cases:
        if case.label is None:
            continue  # whether a case needs a label is the caller's rule
        label = read_image(case.label)  # kept alive: the array below is a view of its buffer
        values = sitk.GetArrayViewFromImage(label)
        if case.label_map is not None:
            values = apply_label_map(values, case.label_map)
        if not np.isin(values, classes.values).any():
            raise CimisError(
                f"label map {case.label} has no voxel of any class to learn ({', '.join(classes.names)})",
                "paint at least one of these structures in it, check the class label values, or leave the case out",
            )
