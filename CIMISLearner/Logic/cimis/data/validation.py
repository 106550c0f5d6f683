"""Checks run wherever data enters the engine: shape, finiteness, grids, label values and memory.

Each check returns nothing when the input is fine and raises :class:`~cimis.errors.CimisError` (naming the
file, saying what is wrong and what to change) when it is not.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassSet
from cimis.data.io import PathLike, geometry_summary, nonfinite_error, same_geometry
from cimis.errors import CimisError

MEMORY_LIMIT_ENV = "CIMIS_MEMORY_LIMIT_BYTES"
"""Environment variable that, when set, replaces the detected available memory (bytes)."""

# Share of the available memory a single allocation estimate may take; the rest covers Python, torch and
# estimation error.
MEMORY_FRACTION = 0.8

# Labels written by other tools are often on a grid that differs from the image's by float rounding (NIfTI
# stores the origin as float32); a thousandth of a voxel is harmless because the label is put on the image's
# grid anyway.
LABEL_GRID_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------- images


def check_3d(image: sitk.Image, path: PathLike) -> None:
    """Refuse anything but a 3D image with one value per voxel (a singleton axis is fine)."""
    dim = image.GetDimension()
    size = "x".join(str(n) for n in image.GetSize())
    if dim == 2:
        raise CimisError(
            f"{path} is a 2D image (size {size}), a 3D volume is needed",
            "for DICOM, point at the folder holding the whole series, not at one slice",
        )
    if dim != 3:
        raise CimisError(
            f"{path} is a {dim}D image (size {size}), a 3D volume is needed",
            "save a single 3D volume (one time point or channel) per file",
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise CimisError(
            f"{path} has {components} values per voxel ({image.GetPixelIDTypeAsString()}), a scalar volume is needed",
            "save one channel per file (e.g. convert RGB screenshots or vector fields back to the scalar volume)",
        )


def check_finite(image: sitk.Image, path: PathLike) -> None:
    """Refuse images with NaN or infinite voxels, saying how many there are."""
    error = nonfinite_error(path, sitk.GetArrayViewFromImage(image))
    if error is not None:
        raise error


def check_same_geometry(
    image: sitk.Image,
    label: sitk.Image,
    image_path: PathLike,
    label_path: PathLike,
    tol: float = LABEL_GRID_TOLERANCE,
) -> None:
    """Refuse a label map whose grid (size, spacing, origin, direction) differs from its image's."""
    if not same_geometry(image, label, tol):
        raise CimisError(
            f"label {label_path} is not on the grid of image {image_path}: "
            f"image {geometry_summary(image)}; label {geometry_summary(label)}",
            "resample the label onto the image with nearest-neighbour interpolation (e.g. in Slicer)",
        )


# --------------------------------------------------------------------------------------------- labels


def label_values(label_array: np.ndarray) -> np.ndarray:
    """The distinct values of a label array, sorted (fast path for the usual uint8/uint16 label maps)."""
    label_array = np.asarray(label_array)
    if label_array.dtype.kind in "ub" and label_array.dtype.itemsize <= 2 and label_array.size:
        return np.flatnonzero(np.bincount(label_array.ravel())).astype(label_array.dtype)
    return np.unique(label_array)


def check_integer_labels(label_array: np.ndarray, path: PathLike) -> None:
    """Refuse label maps holding negative or fractional values (e.g. a label resampled with linear interpolation)."""
    values = label_values(label_array)
    if values.dtype.kind in "ub":
        return
    bad = [
        v for v in values.tolist()
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 and v == int(v))
    ]
    if bad:
        raise CimisError(
            f"label map {path} has values {_preview(bad)} that are not non-negative integers",
            "label maps must hold integer class values; resample labels with nearest-neighbour interpolation",
        )


def check_label_values(label_array: np.ndarray, classes: ClassSet, path: PathLike) -> None:
    """Refuse label values that are neither 0 (background) nor the value of one of ``classes``."""
    allowed = {0, *classes.values}
    # Compare as Python numbers so that 1.5 or -1 never passes as 1 or as a wrapped unsigned value.
    offending = [v for v in label_values(label_array).tolist() if v not in allowed]
    if offending:
        raise CimisError(
            f"label map {path} has values {_preview(offending)} outside the class list "
            f"(allowed: 0 and {sorted(classes.values)})",
            "add those classes to the manifest, or give the case a label_map sending them to a class value or 0",
        )


def check_not_empty(label_array: np.ndarray, path: PathLike) -> None:
    """Refuse a label map without a single foreground voxel."""
    if not np.any(label_array):
        raise CimisError(
            f"label map {path} has no foreground voxel",
            "check its label_map and class values; a case with nothing to learn should have no label",
        )


def _preview(values: list, limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


# --------------------------------------------------------------------------------------------- memory


def available_memory_bytes() -> int:
    """Memory this process can still allocate, in bytes.

    ``CIMIS_MEMORY_LIMIT_BYTES`` overrides the detection. Otherwise the smallest of the system's available
    memory (``MemAvailable`` from /proc/meminfo, or the OS's own figure) and the room left under a cgroup
    memory limit (containers, batch schedulers). When nothing can be measured, returns ``sys.maxsize``.
    """
    override = os.environ.get(MEMORY_LIMIT_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise CimisError(
                f"{MEMORY_LIMIT_ENV}={override!r} is not a number of bytes", f"e.g. {MEMORY_LIMIT_ENV}=8000000000"
            ) from None
    figures = [f for f in (_system_available(), _cgroup_available()) if f is not None]
    return min(figures) if figures else sys.maxsize


def check_fits_in_memory(required_bytes: int, what: str, hint: str) -> None:
    """Refuse when ``required_bytes`` (an estimate for ``what``) exceeds 80% of the available memory.

    Args:
        required_bytes: estimated peak allocation.
        what: what needs the memory, e.g. "loading case 0003 at 0.8 mm spacing".
        hint: what the user can change, e.g. "use a coarser spacing or a smaller patch size".
    """
    available = available_memory_bytes()
    if required_bytes > MEMORY_FRACTION * available:
        raise CimisError(
            f"{what} needs about {format_bytes(required_bytes)} of memory but only {format_bytes(available)} is "
            f"available (at most {MEMORY_FRACTION:.0%} of it is used)",
            hint,
        )


def format_bytes(n: float) -> str:
    """Bytes as a short human-readable amount, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers content


def _system_available() -> int | None:
    """Available physical memory as the operating system reports it."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        return _windows_available()
    try:
        # Linux without MemAvailable has SC_AVPHYS_PAGES; macOS only knows the total, an upper bound.
        pages = os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names else os.sysconf("SC_PHYS_PAGES")
        return int(pages) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _windows_available() -> int | None:
    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
            ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under this process's cgroup memory limit (v2 ``memory.max`` or v1 ``limit_in_bytes``)."""
    root = Path("/sys/fs/cgroup")
    layouts = (  # limit, usage, statistics file, reclaimable-cache key
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    )
    for limit_name, usage_name, stat_name, reclaimable_key in layouts:
        try:
            limit_text = (root / limit_name).read_text().strip()
        except OSError:
            continue
        if not limit_text.isdigit() or int(limit_text) >= 2**60:  # "max" or v1's huge "no limit" value
            return None
        try:
            usage = int((root / usage_name).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        # Inactive page cache counts as usage but is dropped before the limit bites.
        reclaimable = 0
        try:
            for line in (root / stat_name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == reclaimable_key:
                    reclaimable = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit_text) - usage + reclaimable)
    return None
