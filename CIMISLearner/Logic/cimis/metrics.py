"""Per-class segmentation metrics (Dice, HD95, volumes) and the evaluation report.

Inputs are label maps of class *values* (not channels): two numpy arrays on the same 3-D grid, plus the
voxel spacing in mm given **in the array's axis order** (for an array from
``SimpleITK.GetArrayFromImage`` that is ``image.GetSpacing()[::-1]``). Voxels whose value is not in the
:class:`~cimis.data.classes.ClassSet` count as background, so a reference with more organs than the model
knows can be scored on the model's classes only.

Conventions:

- Dice of a class absent from both prediction and reference is NaN (reported as "n/a" and left out of
  means); absent from the reference but predicted, or present in the reference but not predicted, it is 0.
- HD95 is the symmetric 95th-percentile Hausdorff distance between the two surfaces, in mm; NaN when
  either side is empty. It is optional (``hd95=False`` by default) because it is much slower than Dice.
- Every mean is over the finite values only (a NaN-mean); a mean with no finite value is NaN.

Dice uses :func:`monai.metrics.compute_dice`, HD95 :func:`monai.metrics.compute_hausdorff_distance`
(which needs SciPy on the CPU).

Memory: a case is scored class by class on bounding boxes, never as a one-hot volume. Beyond the two input
arrays, the peak is one full-size boolean array (1 byte per voxel, 79 MB for 512x512x300) while the
foreground box is found, then two boolean masks of that box per class; HD95 adds about three float32
arrays on the class's box (union of prediction and reference), e.g. 150 MB for a 250x250x200 liver box.
Dice values come from MONAI in float32 (exact counts, float32 ratio).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from cimis.data.classes import ClassSet
from cimis.data.io import write_json_atomic, write_text_atomic
from cimis.errors import CimisError, printable

Spacing = tuple[float, float, float]
Box = tuple[slice, slice, slice]
Cell = Union[float, str, None]

REPORT_FORMAT = "cimis-evaluation/1"
_MEAN_ROW = "mean"


# --------------------------------------------------------------------------------------------------------
# Validation and bounding boxes
# --------------------------------------------------------------------------------------------------------


def _check_spacing(spacing: Sequence[float]) -> Spacing:
    """The spacing as 3 floats, or a :class:`CimisError` if it is not 3 finite positive numbers."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise CimisError(f"voxel spacing must be 3 positive numbers in mm, got {spacing!r}") from exc
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise CimisError(f"voxel spacing must be 3 positive numbers in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _check_label(label: np.ndarray, what: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 3:
        raise CimisError(f"{what} label map must be 3-D, got shape {label.shape}")
    return label


def _mask_box(mask: np.ndarray) -> Box | None:
    """Tight bounding box of the true voxels, or None if there are none; uses 1-D projections only."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _union_box(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore


def _foreground_box(*labels: np.ndarray) -> Box | None:
    """Box holding every non-zero voxel of all maps; one full-size boolean mask alive at a time."""
    box: Box | None = None
    for label in labels:
        box = _union_box(box, _mask_box(label != 0))
    return box


def _voxel_ml(spacing: Spacing) -> float:
    return float(np.prod(spacing)) / 1000.0  # mm^3 -> mL


def class_volumes_ml(label: np.ndarray, spacing: Sequence[float], classes: ClassSet) -> dict[str, float]:
    """Volume in mL of every class of ``classes`` in a label map of class values (0.0 when absent)."""
    label = _check_label(label, "the")
    voxel_ml = _voxel_ml(_check_spacing(spacing))
    box = _foreground_box(label)
    if box is None:
        return {c.name: 0.0 for c in classes}
    crop = label[box]
    return {c.name: int(np.count_nonzero(crop == c.value)) * voxel_ml for c in classes}


# --------------------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------------------


def _hd95_monai(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    value = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None],
        include_background=True, percentile=95, spacing=list(spacing),
    )
    return float(value[0, 0])


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks; NaN if either is empty.

    MONAI computes it; the masks are first cropped to the box of their union (the distances do not change,
    the work shrinks from the whole CT to one organ's neighbourhood).
    """
    spacing_ = _check_spacing(spacing)
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        return math.nan
    box = _union_box(_mask_box(pred), _mask_box(ref))
    return _hd95_monai(np.ascontiguousarray(pred[box]), np.ascontiguousarray(ref[box]), spacing_)


# --------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------


@dataclass
class CaseMetrics:
    """Metrics of one case, keyed by class name (every class of the evaluated set is present)."""

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float] | None  # mm; None when HD95 was not computed
    volume_ml_pred: dict[str, float]
    volume_ml_ref: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN becomes None."""
        return {
            "case_id": self.case_id,
            "dice": _nan_to_none(self.dice),
            "hd95": None if self.hd95 is None else _nan_to_none(self.hd95),
            "volume_ml_pred": _nan_to_none(self.volume_ml_pred),
            "volume_ml_ref": _nan_to_none(self.volume_ml_ref),
        }

    @staticmethod
    def from_dict(entry: dict) -> "CaseMetrics":
        hd95 = entry.get("hd95")
        return CaseMetrics(
            case_id=str(entry["case_id"]),
            dice=_none_to_nan(entry["dice"]),
            hd95=None if hd95 is None else _none_to_nan(hd95),
            volume_ml_pred=_none_to_nan(entry.get("volume_ml_pred", {})),
            volume_ml_ref=_none_to_nan(entry.get("volume_ml_ref", {})),
        )


def _dice(pred: np.ndarray, ref: np.ndarray, n_pred: int, n_ref: int) -> float:
    """Dice of two boolean masks with the module's empty-set conventions; MONAI does the overlap."""
    if n_pred == 0 and n_ref == 0:
        return math.nan
    if n_pred == 0 or n_ref == 0:
        return 0.0
    value = compute_dice(
        torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None],
        include_background=True, ignore_empty=False,
    )
    return float(value[0, 0])


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    classes: ClassSet,
    case_id: str = "case",
    hd95: bool = False,
) -> CaseMetrics:
    """Dice (and optionally HD95 in mm) per class between a predicted and a reference label map.

    Both maps hold class values on the same grid; ``spacing`` is in mm, in the arrays' axis order. Raises
    :class:`CimisError` if the shapes differ or the spacing is not 3 positive numbers.
    """
    pred, ref = _check_label(pred, "the predicted"), _check_label(ref, "the reference")
    if pred.shape != ref.shape:
        raise CimisError(
            f"case {case_id}: prediction shape {pred.shape} differs from reference shape {ref.shape}",
            "resample the prediction onto the reference grid",
        )
    spacing_ = _check_spacing(spacing)
    voxel_ml = _voxel_ml(spacing_)
    result = CaseMetrics(case_id, {}, {} if hd95 else None, {}, {})
    box = _foreground_box(pred, ref)
    # Cropping to the joint foreground first makes the per-class comparisons cost the organs' extent,
    # not the whole scan.
    pred_crop, ref_crop = (pred[box], ref[box]) if box is not None else (pred[:0], ref[:0])
    for c in classes:
        p, r = pred_crop == c.value, ref_crop == c.value
        cbox = _union_box(_mask_box(p), _mask_box(r)) if p.size else None
        if cbox is not None:
            p, r = np.ascontiguousarray(p[cbox]), np.ascontiguousarray(r[cbox])
        n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
        result.dice[c.name] = _dice(p, r, n_pred, n_ref)
        result.volume_ml_pred[c.name] = n_pred * voxel_ml
        result.volume_ml_ref[c.name] = n_ref * voxel_ml
        if result.hd95 is not None:
            result.hd95[c.name] = hd95_mm(p, r, spacing_) if n_pred and n_ref else math.nan
    return result


# --------------------------------------------------------------------------------------------------------
# Statistics and formatting helpers
# --------------------------------------------------------------------------------------------------------


def _finite(values: Iterable[float | None]) -> np.ndarray:
    arr = np.array([math.nan if v is None else v for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def _nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values; NaN (without NumPy's empty-slice warning) when there are none."""
    arr = _finite(values)
    return float(arr.mean()) if arr.size else math.nan


def _nanstd(values: Iterable[float | None]) -> float:
    """Population standard deviation (ddof=0) of the finite values; NaN when there are none."""
    arr = _finite(values)
    return float(arr.std()) if arr.size else math.nan


def _json_float(value: float | None) -> float | None:
    """JSON has no NaN: non-finite values are written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: _json_float(v) for k, v in values.items()}


def _none_to_nan(values: dict) -> dict[str, float]:
    return {str(k): (math.nan if v is None else float(v)) for k, v in values.items()}


def _format_cell(value: Cell, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def csv_text_cell(text: str) -> str:
    """A text cell for CSV that a spreadsheet shows as text: a leading ``=``, ``+``, ``-``, ``@``, tab or
    carriage return would make it a formula (CSV injection), so such a cell gets a leading apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def format_class_table(
    rows: dict[str, dict[str, Cell]], columns: list[str], first_column: str = "class", digits: int = 3
) -> str:
    """A Markdown pipe table, padded so it also reads well in a terminal.

    ``rows`` maps a row label (a class name, "mean") to its cells by column name. Numbers are printed
    with ``digits`` decimals, NaN/None/missing cells as "n/a", strings as they are.
    """
    header = [printable(text, table_cell=True) for text in [first_column, *columns]]
    body = [[printable(label, table_cell=True),
             *(printable(_format_cell(cells.get(col), digits), table_cell=True) for col in columns)]
            for label, cells in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _mean_std_cell(values: list[float], digits: int) -> Cell:
    """A table cell: mean ± std over cases when there are several, the plain mean for one, NaN if none."""
    mean = _nanmean(values)
    if len(values) < 2 or not math.isfinite(mean):
        return mean
    return f"{mean:.{digits}f} ± {_nanstd(values):.{digits}f}"


# --------------------------------------------------------------------------------------------------------
# Report over cases
# --------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Metrics of several cases for one class set, with per-class means and Markdown/CSV/JSON output."""

    classes: ClassSet
    cases: list[CaseMetrics] = field(default_factory=list)

    # -- statistics ---------------------------------------------------------------------------------------

    def _per_class(self, metric: str) -> dict[str, list[float]]:
        """Class name -> that metric over the cases that have it (cases without HD95 are skipped)."""
        out: dict[str, list[float]] = {name: [] for name in self.classes.names}
        for case in self.cases:
            values = getattr(case, metric)
            if values is None:
                continue
            for name in out:
                out[name].append(values.get(name, math.nan))
        return out

    def _has_hd95(self) -> bool:
        return any(case.hd95 is not None for case in self.cases)

    def mean_dice(self) -> dict[str, float]:
        """Per class, the mean Dice over the cases where it is defined (NaN if it is defined in none)."""
        return {name: _nanmean(v) for name, v in self._per_class("dice").items()}

    def mean_hd95(self) -> dict[str, float] | None:
        """Per class, the mean HD95 in mm over cases; None if no case has HD95."""
        if not self._has_hd95():
            return None
        return {name: _nanmean(v) for name, v in self._per_class("hd95").items()}

    def overall_mean_dice(self, class_names: list[str] | None = None) -> float:
        """Mean over classes of the per-class mean Dice; ``class_names`` picks a subset (e.g. old classes)."""
        means = self.mean_dice()
        names = self.classes.names if class_names is None else [self.classes.by_name(n).name for n in class_names]
        return _nanmean(means[n] for n in names)

    def _case_means(self, metric: str) -> list[float]:
        """Each case's mean over classes, for the spread shown on the table's mean row."""
        return [_nanmean(getattr(c, metric).values()) for c in self.cases if getattr(c, metric) is not None]

    # -- output -------------------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        """Table ``class | Dice | HD95 (mm)`` with a row per class and a "mean" row, plus a one-line legend.

        With several cases a cell reads "mean ± std" over cases (population std). The mean row holds the
        mean over classes of the per-class means; its ± is the spread over cases of each case's class mean.
        """
        digits = 3
        columns = ["Dice"] + (["HD95 (mm)"] if self._has_hd95() else [])
        series = {"Dice": self._per_class("dice"), "HD95 (mm)": self._per_class("hd95")}
        rows: dict[str, dict[str, Cell]] = {
            name: {col: _mean_std_cell(series[col][name], digits) for col in columns} for name in self.classes.names
        }
        overall = {"Dice": self.overall_mean_dice(), "HD95 (mm)": _nanmean((self.mean_hd95() or {}).values())}
        case_means = {"Dice": self._case_means("dice"), "HD95 (mm)": self._case_means("hd95")}
        rows[_MEAN_ROW] = {col: self._mean_row_cell(overall[col], case_means[col], digits) for col in columns}
        return format_class_table(rows, columns, digits=digits) + "\n\n" + self._legend() + "\n"

    def _legend(self) -> str:
        parts = [f"{len(self.cases)} case(s)"]
        if len(self.cases) > 1:
            parts.append("mean ± std over cases")
        parts.append("n/a: class absent from prediction and reference (Dice)")
        if self._has_hd95():
            parts[-1] += " or from either (HD95, in mm)"
        return "_" + "; ".join(parts) + "._"

    @staticmethod
    def _mean_row_cell(overall: float, case_means: list[float], digits: int) -> Cell:
        if len(case_means) < 2 or not math.isfinite(overall):
            return overall
        return f"{overall:.{digits}f} ± {_nanstd(case_means):.{digits}f}"

    def to_dict(self) -> dict:
        """Classes, per-case metrics, per-class means and standard deviations; JSON-ready (NaN -> None)."""
        hd95_mean = self.mean_hd95()
        return {
            "format": REPORT_FORMAT,
            "classes": self.classes.to_json(),
            "num_cases": len(self.cases),
            "mean": {
                "dice": _nan_to_none(self.mean_dice()),
                "hd95": None if hd95_mean is None else _nan_to_none(hd95_mean),
                "overall_dice": _json_float(self.overall_mean_dice()),
            },
            "std": {
                "dice": _nan_to_none({n: _nanstd(v) for n, v in self._per_class("dice").items()}),
                "hd95": None if hd95_mean is None
                else _nan_to_none({n: _nanstd(v) for n, v in self._per_class("hd95").items()}),
            },
            "cases": [case.to_dict() for case in self.cases],
        }

    def to_json(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write :meth:`to_dict` atomically (an existing file only with ``overwrite``)."""
        # allow_nan=False: a stray NaN must fail here rather than produce a file strict parsers reject.
        return write_json_atomic(path, self.to_dict(), overwrite)

    def to_csv(self, path: str | Path, overwrite: bool = False) -> Path:
        """One row per (case, class), then one row per class with case_id "mean"; NaN as an empty field.
        Written atomically (an existing file only with ``overwrite``)."""
        return write_text_atomic(path, self.csv_text(), overwrite)

    def csv_text(self) -> str:
        hd95_mean = self.mean_hd95() or {}
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["case_id", "class", "dice", "hd95_mm", "volume_ml_pred", "volume_ml_ref"])
        for case in self.cases:
            for name in self.classes.names:
                writer.writerow([csv_text_cell(case.case_id), csv_text_cell(name), *map(_csv_number, [
                    case.dice.get(name), (case.hd95 or {}).get(name),
                    case.volume_ml_pred.get(name), case.volume_ml_ref.get(name),
                ])])
        vol_pred, vol_ref = self._per_class("volume_ml_pred"), self._per_class("volume_ml_ref")
        for name, dice in self.mean_dice().items():
            writer.writerow([_MEAN_ROW, csv_text_cell(name), *map(_csv_number, [
                dice, hd95_mean.get(name), _nanmean(vol_pred[name]), _nanmean(vol_ref[name]),
            ])])
        return buffer.getvalue()

    def write(self, out_dir: str | Path, stem: str = "evaluation", overwrite: bool = False) -> dict[str, Path]:
        """Write ``stem.md``, ``stem.csv`` and ``stem.json`` into ``out_dir``; returns them by extension.

        Each file is written atomically. Without ``overwrite`` an existing report is refused before any
        file is written.

        Raises:
            CimisError: ``out_dir`` is a file, a report file exists and ``overwrite`` is false, or a write
                fails (read-only folder, full disk).
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise CimisError(f"{out_dir} is a file, a folder is needed for the evaluation report",
                             "give --out a folder (it is created when missing)")
        paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json")}
        existing = [p for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise CimisError(f"{existing[0]} already exists", "choose another --out folder or pass --overwrite")
        write_text_atomic(paths["md"], self.to_markdown(), overwrite)
        self.to_csv(paths["csv"], overwrite)
        self.to_json(paths["json"], overwrite)
        return paths

    @staticmethod
    def from_json(path: str | Path) -> "EvaluationReport":
        """Read a report written by :meth:`to_json` (means are recomputed from the cases)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CimisError(f"cannot read evaluation report {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise CimisError(f"{path} is not a {REPORT_FORMAT} evaluation report")
        try:
            cases = [CaseMetrics.from_dict(c) for c in data["cases"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CimisError(f"malformed case entry in evaluation report {path}: {exc}") from exc
        return EvaluationReport(ClassSet.from_json(data.get("classes")), cases)


def _csv_number(value: float | None) -> str:
    value = _json_float(value)
    return "" if value is None else repr(value)
