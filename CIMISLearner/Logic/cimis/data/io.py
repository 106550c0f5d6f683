"""Volume IO through SimpleITK: read and write image files and DICOM series, compare and describe geometry.

Every failure the user can cause (a missing path, a corrupt file, an existing output) is raised as
:class:`~cimis.errors.CimisError` naming the file. Writes never leave a half-written file behind: the data is
written into a hidden staging folder beside the destination and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import re
import shutil
import struct
import tempfile
import time
import unicodedata
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import SimpleITK as sitk

from cimis.errors import CimisError
from cimis.fsync import fsync_file, sync_tree

PathLike = Union[str, "os.PathLike[str]"]
"""A path given as a string or a path object."""

# Formats whose writers support compression; .nii cannot be compressed (that is what .nii.gz is for).
_COMPRESSED_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_DICOM_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_INT16_MIN, _INT16_MAX = -32768, 32767


# --------------------------------------------------------------------------------------------- reading


def read_image(path: PathLike) -> sitk.Image:
    """Read a volume from an image file SimpleITK understands, or from a folder holding a DICOM series.

    A folder with several series yields the series with the most files (with a warning naming the choice).

    Raises:
        CimisError: the path does not exist, the file cannot be read, the folder holds no DICOM series, or
            the volume has NaN or infinite voxels (whatever the format: NIfTI's are checked in the file).
    """
    path = Path(path)
    if not path.exists():
        raise CimisError(f"{path} does not exist", "check the path (relative paths are relative to the manifest)")
    if path.is_dir():
        return _read_dicom_folder(path)
    name = path.name.lower()
    nifti = name.endswith((".nii", ".nii.gz"))
    if nifti:
        _check_nifti_complete(path, compressed=name.endswith(".gz"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CimisError(
            f"cannot read image file {path}: {_sitk_reason(exc)}",
            "check that it is a complete NIfTI, NRRD, MetaImage or DICOM file",
        ) from None
    _check_finite_after_reading(image, path, nifti)
    return image


def _check_finite_after_reading(image: sitk.Image, path: Path, nifti: bool = False) -> None:
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind not in "fc":
        return
    error = nonfinite_error(path, values)
    if error is not None:
        raise error
    if nifti:  # ITK's NIfTI reader has already turned NaN and infinity into 0
        _check_nifti_finite(path, values)


def nonfinite_error(path: PathLike, values: np.ndarray) -> CimisError | None:
    """The error for an array holding NaN or infinite values (None when every value is finite)."""
    if values.dtype.kind not in "fc" or np.isfinite(values).all():  # integer arrays are always finite
        return None
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    return CimisError(
        f"{path} has {nan} NaN and {inf} infinite voxels out of {values.size}",
        "fix or re-export the image; NaN usually comes from a failed resampling or division",
    )


def _check_nifti_finite(path: Path, values: np.ndarray) -> None:
    """Refuse a float NIfTI file holding NaN or infinite voxels. ITK's NIfTI reader turns them into 0, so
    when ``values`` (what ITK read) has a 0, the stored values are streamed from the file and checked."""
    if not (values == 0).any():
        return  # no 0 read back, so no NaN or infinity was turned into one
    compressed = path.name.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            layout = _nifti_layout(fh.read(540))
            float_types = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
            if layout is None or layout["datatype"] not in float_types:
                return
            dtype = np.dtype(layout["endian"] + float_types[layout["datatype"]])
            fh.seek(layout["offset"])
            remaining, nan, inf = layout["voxels"], 0, 0
            while remaining > 0:
                chunk = np.frombuffer(fh.read(min(remaining, 1 << 22) * dtype.itemsize), dtype)
                if not chunk.size:
                    break
                nan += int(np.isnan(chunk).sum())
                inf += int(np.isinf(chunk).sum())
                remaining -= chunk.size
    except (OSError, EOFError, zlib.error, ValueError):
        return  # ITK has read the file; its completeness was checked before
    if nan or inf:
        raise CimisError(
            f"{path} has {nan} NaN and {inf} infinite voxels out of {values.size}",
            "fix or re-export the image; NaN usually comes from a failed resampling or division",
        )


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the largest DICOM series found directly in ``folder``."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, stacklevel=4))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CimisError(
            f"cannot read the DICOM series in {folder}: {_sitk_reason(exc)}",
            "check that the series is complete and its slices share one orientation",
        ) from None
    _check_finite_after_reading(image, folder)
    return image


def dicom_series_files(folder: PathLike, stacklevel: int = 2) -> list[str]:
    """The files of the DICOM series :func:`read_image` reads from ``folder``: the series with the most files
    (with a warning naming the choice when there are several).

    Raises:
        CimisError: the folder is empty or holds no DICOM series.
    """
    folder = Path(folder)
    if not any(folder.iterdir()):
        raise CimisError(f"folder {folder} is empty", "point at an image file or at a folder holding a DICOM series")
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise CimisError(f"cannot scan folder {folder} for DICOM: {_sitk_reason(exc)}") from None
    if not series_ids:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise CimisError(
            f"folder {folder} holds no DICOM series",
            f"point at the subfolder holding the slices (it has {', '.join(subfolders[:5])})"
            if subfolders
            else "point at an image file (.nii.gz, .nrrd, .mha) or at the folder holding the DICOM slices",
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files[sid]))
    if len(series_ids) > 1:
        warnings.warn(
            f"folder {folder} holds {len(series_ids)} DICOM series; reading {chosen} ({len(files[chosen])} files), "
            "the one with the most files",
            stacklevel=stacklevel,
        )
    return list(files[chosen])


def _check_nifti_complete(path: Path, compressed: bool) -> None:
    """Refuse a truncated NIfTI file (ITK's NIfTI reader silently fills the missing voxels with zeros).

    The size the header promises is compared with the file size or, for .nii.gz, with the uncompressed size
    in the gzip trailer; only when the trailer disagrees (also the case for multi-member gzip files) is the
    stream decompressed to be sure.
    """
    truncated = CimisError(f"image file {path} is truncated or corrupt", "download or copy the file again")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(540)
    except (EOFError, zlib.error):  # the gzip stream ends (or breaks) within the first bytes
        raise truncated from None
    except OSError:
        return  # not a gzip or not readable at all; the SimpleITK reader gives the reason
    expected = _nifti_data_end(header)
    if expected is None:
        return
    if not compressed:
        if path.stat().st_size < expected:
            raise truncated
        return
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        if struct.unpack("<I", fh.read(4))[0] == expected % 2**32:  # gzip ISIZE: uncompressed size mod 2^32
            return
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise truncated from None
    if total < expected:
        raise truncated


def _nifti_data_end(header: bytes) -> int | None:
    """Offset of the end of the voxel data from a NIfTI-1 or NIfTI-2 header, or None if it is not one."""
    layout = _nifti_layout(header)
    if layout is None:
        return None
    return layout["offset"] + layout["voxels"] * layout["bitpix"] // 8


def _nifti_layout(header: bytes) -> dict | None:
    """Byte order, datatype code, bits per voxel, voxel count and data offset from a NIfTI-1 or NIfTI-2
    header, or None if it is not one."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    return {"endian": endian, "datatype": datatype, "bitpix": bitpix, "voxels": voxels,
            "offset": max(offset, 348)}


def _sitk_reason(exc: RuntimeError) -> str:
    """The useful part of a SimpleITK exception: its message lines without source locations and object prefixes."""
    lines = str(exc).splitlines()[1:] or [str(exc)]  # the first line only says where in SimpleITK it was thrown
    cleaned = []
    for line in lines:
        line = re.sub(r"^\s*(sitk::ERROR:|ITK ERROR:|itk::ERROR:)\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", line)
        line = re.sub(r"^\[\w+\]\s*", "", line).strip()  # NRRD's "[nrrd] " prefix
        if line and "trouble" not in line:  # NRRD's call-stack lines ("nrrdLoad: trouble reading") say nothing
            cleaned.append(line)
    reason = " ".join(cleaned) or str(exc).strip()
    return reason if len(reason) <= 240 else reason[:237] + "..."


# --------------------------------------------------------------------------------------------- file names

_FORBIDDEN_IN_NAMES = set('/\\:*?"<>|')  # separators, and what Windows refuses in a file name
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_ID_BYTES = 200  # below the usual 255-byte file-name limit, leaving room for a suffix


def check_id_as_file_name(value: Any, what: str) -> str:
    """``value`` if it can be used as a file name (``ID.nii.gz``) inside a chosen folder, on every platform.

    Spaces and non-ASCII letters are fine; path separators, ``.``/``..``, a leading dot (hidden files and
    our own staging folders), control characters, characters Windows refuses and its device names are not,
    so an id can never write outside the folder it is meant for.

    Raises:
        CimisError: naming ``what`` (e.g. "case id") and the reason.
    """
    if not isinstance(value, str) or not value.strip():
        raise CimisError(f"{what} must be a non-empty string, got {value!r}")
    reason = None
    if value in (".", "..") or value.startswith("."):
        reason = "it starts with '.'"
    elif any(c in _FORBIDDEN_IN_NAMES for c in value):
        reason = f"it contains {next(c for c in value if c in _FORBIDDEN_IN_NAMES)!r}"
    elif any(unicodedata.category(c)[0] == "C" for c in value):
        reason = "it contains a control character"
    elif value != value.strip() or value.endswith("."):
        reason = "it starts or ends with a space, or ends with '.'"
    elif value.split(".")[0].lower() in _WINDOWS_DEVICES:
        reason = "Windows reserves that name for a device"
    elif len(value.encode("utf-8")) > MAX_ID_BYTES:
        reason = f"it is longer than {MAX_ID_BYTES} bytes"
    if reason is not None:
        raise CimisError(f"{what} {value!r} cannot name a file: {reason}",
                         "ids name output files (ID.nii.gz); use letters, digits, spaces, '.', '_' and '-'")
    return value


# --------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def staged_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path with ``path``'s file name; when the block succeeds, move the result into place.

    The temporary path lies in a hidden folder next to ``path`` (same file system, so the final
    ``os.replace`` is atomic). Companion files written there too (the ``.raw`` of a ``.mhd``) are moved
    along, the main file last, so a crash never leaves a header pointing at missing data.

    Raises:
        CimisError: ``path`` (or a companion file) exists and ``overwrite`` is false, or the folder is not writable.
    """
    path = Path(path)
    _refuse_existing(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as exc:
        raise CimisError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable output folder") from None
    try:
        yield stage / path.name
        produced = sorted(stage.iterdir(), key=lambda p: p.name == path.name)  # main file last
        for item in produced:
            _refuse_existing(path.parent / item.name, overwrite)
        for item in produced:
            if item.is_file():
                fsync_file(item)  # a full disk that the write did not report can still surface here
        for item in produced:
            os.replace(item, path.parent / item.name)
    except OSError as exc:
        raise CimisError(
            f"cannot write {path}: {exc.strerror or exc}", "check free disk space and permissions"
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CimisError(f"{path} already exists", "choose another output path or pass --overwrite")


def check_folder_output(out: PathLike, what: str) -> None:
    """Refuse an output folder ``out`` that is a file or lies under one, before any work is done."""
    out = Path(out)
    for place in (out, *out.parents):
        if place.is_dir():
            return
        if place.exists() or place.is_symlink():
            below = "" if place == out else f", so {out} cannot be created"
            raise CimisError(f"{place} is a file{below}", f"give a folder for the {what}")


def check_replaceable_folder(out: PathLike, overwrite: bool, own_entries: set[str], signature: str, what: str) -> None:
    """Refuse an output ``out`` that is a file (or lies under one), or a non-empty folder unless
    ``overwrite`` is given and the folder holds an earlier ``what`` and nothing else (only ``own_entries``
    at its top, ``signature`` present): ``--overwrite`` must never delete a user's own files."""
    out = Path(out)
    check_folder_output(out, what)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CimisError(f"{out} already exists and is not empty", "choose another output or pass --overwrite")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own_entries)
    if foreign or not (out / signature).is_file():
        raise CimisError(f"{out} does not hold an earlier {what}"
                         + (f" (it holds {', '.join(foreign[:5])})" if foreign else ""),
                         f"--overwrite replaces only an earlier {what}; choose another output")


@contextlib.contextmanager
def csv_writer_atomic(path: PathLike):
    """A ``csv.writer`` whose rows replace ``path`` in one atomic write when the block ends: a report that
    is rewritten by every run (and may be open in a spreadsheet) is never left torn or empty."""
    buffer = io.StringIO(newline="")
    yield csv.writer(buffer)
    write_text_atomic(path, buffer.getvalue(), overwrite=True)


def write_text_atomic(path: PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` so that ``path`` holds either its old content or the complete new one, never a torn
    or empty file: a temporary file in the same folder, flushed and fsynced, then one ``os.replace``.

    Raises:
        CimisError: ``path`` exists and ``overwrite`` is false, ``path`` is a folder, or the write fails
            (read-only folder, full disk); an existing file is then left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise CimisError(f"cannot write {path}: it is a folder", "give a file path")
    _refuse_existing(path, overwrite)
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from the group
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
        temporary = None
    except (NotADirectoryError, FileExistsError):
        raise CimisError(f"cannot write {path}: a file stands where a folder is needed",
                         "choose an output path whose parent folders are folders") from None
    except OSError as exc:
        raise CimisError(f"cannot write {path}: {exc.strerror or exc}",
                         "check free disk space and permissions, or choose another output folder") from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    return path


def write_json_atomic(path: PathLike, data: Any, overwrite: bool = False) -> Path:
    """:func:`write_text_atomic` of ``data`` as indented JSON (NaN refused: strict parsers reject it)."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n", overwrite)


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` (format from the extension), compressed where the format allows.

    Parent folders are created. Returns the path written.

    Raises:
        CimisError: ``path`` exists and ``overwrite`` is false, or the extension names no writable format.
    """
    path = Path(path)
    compress = path.name.lower().endswith(_COMPRESSED_SUFFIXES)
    with staged_output(path, overwrite) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            reason = _sitk_reason(exc)
            full = "space" in reason.lower() or "wrote only" in reason.lower()
            raise CimisError(
                f"cannot write image file {path}: {reason}",
                "free disk space or choose another output folder" if full
                else "use an extension such as .nii.gz, .nrrd or .mha",
            ) from None
        _check_written(image, tmp, path)
    return path


def _check_written(image: sitk.Image, staged: Path, path: Path) -> None:
    """Read the staged file back and compare it with ``image``: ITK's NIfTI writer reports no error when the
    disk fills up (it leaves a truncated or empty file), so only a read-back shows that the write failed."""
    failed = CimisError(f"cannot write image file {path}: the written file does not read back complete "
                        "(is the disk full?)", "free disk space or choose another output folder")
    name = staged.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti_complete(staged, compressed=name.endswith(".gz"))
        back = sitk.ReadImage(str(staged))
    except (CimisError, RuntimeError):
        raise failed from None
    if back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel():
        raise failed
    written, wanted = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
    if wanted.dtype.kind in "fc":  # NIfTI reads NaN and infinity back as 0: compare the finite voxels
        finite = np.isfinite(wanted)
        written, wanted = written[finite], wanted[finite]
    if not np.array_equal(written, wanted):
        raise failed


def write_dicom_series(
    image: sitk.Image, folder: PathLike, overwrite: bool = False, tags: dict[str, str] | None = None
) -> Path:
    """Write a 3D scalar image as a CT DICOM series, one file per slice, that reads back on the same grid.

    Pixels are stored as int16. Integer images are stored exactly (with an integer rescale intercept when
    their range does not fit int16 but spans at most 65536 values); other images are quantised to int16
    through the rescale slope/intercept, so values come back within half a slope step. DICOM can only
    describe right-handed grids: an image whose direction has determinant -1 is written with its slice
    order reversed (the same voxels in space) and a warning. ``tags`` ("gggg|eeee" -> value) are added to
    every slice, e.g. ``{"0008|103e": "liver model output"}``.

    Raises:
        CimisError: the image is not 3D scalar, or ``folder`` exists, is not empty and ``overwrite`` is false.
    """
    folder = Path(folder)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CimisError(f"cannot write {folder} as DICOM: only 3D scalar images can be written as a series")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise CimisError(f"{folder} already exists and is not empty", "choose another folder or pass --overwrite")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) < 0:
        warnings.warn(
            f"{folder}: the image grid is left-handed, which DICOM cannot describe; writing the slices in reverse "
            "order (same voxels in space, flipped third axis)",
            stacklevel=2,
        )
        image = sitk.Flip(image, [False, False, True])  # keeps physical positions, makes the grid right-handed
        direction = np.array(image.GetDirection()).reshape(3, 3)

    pixels, rescale_tags = _dicom_pixels(sitk.GetArrayViewFromImage(image))
    spacing = image.GetSpacing()
    study_uid, series_uid, frame_uid = (_new_uid() for _ in range(3))
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series_tags = {
        "0008|0016": _DICOM_CT_IMAGE_STORAGE,
        "0008|0020": now[0], "0008|0030": now[1],  # study date and time
        "0008|0060": "CT",  # with CT, GDCM keeps the slice position and thickness
        "0008|103e": "CIMISLearner export",
        "0010|0010": "Anonymous", "0010|0020": "cimis",
        "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid,
        "0020|0011": "1",
        # DICOM orientation: the direction of increasing column index (x), then of increasing row index (y).
        "0020|0037": _ds([*direction[:, 0], *direction[:, 1]]),
        "0028|0030": _ds([spacing[1], spacing[0]]),  # PixelSpacing is row spacing \ column spacing
        "0018|0050": _ds([spacing[2]]),
        "0018|0088": _ds([spacing[2]]),
        **rescale_tags,
        **(tags or {}),
    }
    normal = direction[:, 2]
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=_make_parent(folder)))
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # keep the UIDs set below instead of generating new ones
        for k in range(pixels.shape[0]):
            # Each slice is built from the array, not by slicing the 3D image: slicing an oblique image needs
            # a non-singular 2D sub-direction, while the tags below carry the full 3D geometry anyway.
            slice_image = sitk.GetImageFromArray(pixels[k])
            slice_image.SetSpacing(spacing[:2])
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            for tag, value in series_tags.items():
                slice_image.SetMetaData(tag, value)
            slice_image.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
            slice_image.SetMetaData("0020|0013", str(k + 1))
            slice_image.SetMetaData("0020|0032", _ds(position))
            slice_image.SetMetaData("0020|1041", _ds([float(np.dot(position, normal))]))
            writer.SetFileName(str(stage / f"IM{k + 1:05d}.dcm"))
            writer.Execute(slice_image)
        replace_folder(stage, folder)
    except RuntimeError as exc:
        raise CimisError(f"cannot write DICOM series {folder}: {_sitk_reason(exc)}") from None
    except OSError as exc:
        raise CimisError(f"cannot write DICOM series {folder}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _make_parent(folder: Path) -> Path:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CimisError(f"cannot create {folder.parent}: {exc.strerror or exc}") from None
    return folder.parent


def replace_folder(stage: Path, folder: Path) -> None:
    """Move the finished ``stage`` folder to ``folder``, replacing an old one only once the new one is whole.

    The old folder is first renamed aside, then ``stage`` takes its name, and only then is the old copy
    deleted: a kill at any moment leaves a whole folder under ``folder`` or aside, and a failure to delete
    the old copy (a read-only file in it) never touches the new one. The files of ``stage`` are flushed to
    disk before the swap, so a power cut cannot leave the new name pointing at empty files.
    """
    sync_tree(stage)
    if not folder.exists():
        os.replace(stage, folder)
        return
    trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(folder, trash)
    try:
        os.replace(stage, folder)
    except OSError:
        os.replace(trash, folder)  # the new copy could not take the name: the old one keeps it
        raise
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            trash.unlink()


def _dicom_pixels(values: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """The array to hand to GDCM and the rescale tags that make its stored int16 values decode to ``values``.

    GDCM applies the inverse rescale itself when writing and accepts only an integer slope and intercept for
    integer input, so non-integer scaling goes through a float array.
    """
    storage = {"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"}  # signed 16 bit
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    integral = values.dtype.kind in "biu" or bool(np.all(np.mod(values, 1) == 0))
    if integral and _INT16_MIN <= lo and hi <= _INT16_MAX:
        return values.astype(np.int16), {**storage, "0028|1052": "0", "0028|1053": "1"}
    if integral and hi - lo <= _INT16_MAX - _INT16_MIN and -(2**31) <= lo and hi < 2**31:
        intercept = int(lo) - _INT16_MIN  # stored = value - intercept spans -32768..32767
        return values.astype(np.int32), {**storage, "0028|1052": str(intercept), "0028|1053": "1"}
    intercept = float(round((lo + hi) / 2))  # GDCM insists on an integral intercept
    slope = max(hi - intercept, intercept - lo) / 32000.0 or 1.0  # margin below 32767 for rounding
    return values.astype(np.float64), {**storage, "0028|1052": _ds([intercept]), "0028|1053": _ds([slope])}


def _ds(values) -> str:
    """A DICOM decimal-string list: at most 16 characters per value, backslash separated."""
    return "\\".join(_ds_one(float(v)) for v in values)


def _ds_one(v: float) -> str:
    for digits in range(12, 5, -1):
        text = f"{v:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{v:.6g}"


def _new_uid() -> str:
    """A globally unique DICOM UID from a random UUID (the 2.25 root needs no registered organisation)."""
    return f"2.25.{uuid.uuid4().int}"


# --------------------------------------------------------------------------------------------- geometry


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Whether ``a`` and ``b`` lie on the same voxel grid.

    Sizes must be equal; spacings may differ by ``tol`` relative, origins by ``tol`` times the smallest
    spacing (a fraction of a voxel), direction cosines by ``tol`` absolute.
    """
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    voxel = float(min(sa.min(), sb.min()))
    return bool(
        np.all(np.abs(sa - sb) <= tol * np.maximum(np.abs(sa), np.abs(sb)))
        and np.all(np.abs(np.subtract(a.GetOrigin(), b.GetOrigin())) <= tol * voxel)
        and np.all(np.abs(np.subtract(a.GetDirection(), b.GetDirection())) <= tol)
    )


def copy_geometry(source: sitk.Image, target: sitk.Image) -> sitk.Image:
    """``target`` with ``source``'s spacing, origin and direction (sizes must match); modifies ``target``."""
    if source.GetSize() != target.GetSize():
        raise CimisError(
            f"cannot copy geometry between images of sizes {_size_text(source)} and {_size_text(target)}"
        )
    target.CopyInformation(source)
    return target


def geometry_summary(image: sitk.Image) -> str:
    """A one-line description of an image's grid for messages: size, spacing, origin and (if not identity) direction."""
    text = (
        f"size {_size_text(image)}, spacing {'x'.join(_mm(s) for s in image.GetSpacing())} mm, "
        f"origin ({', '.join(_mm(o) for o in image.GetOrigin())})"
    )
    direction = np.array(image.GetDirection())
    if not np.allclose(direction, np.eye(image.GetDimension()).ravel()):
        text += f", direction ({', '.join(f'{d:.4g}' for d in direction)})"
    return text


def _mm(value: float) -> str:
    """A length to 0.1 micrometre, without trailing zeros: enough to show why two grids differ."""
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


def _size_text(image: sitk.Image) -> str:
    return "x".join(str(n) for n in image.GetSize())
