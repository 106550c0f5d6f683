"""DICOM SEG output: a label map on a DICOM series' grid written as a DICOM Segmentation (highdicom), so a
result goes back to PACS inside the source's study, referencing the source instances frame by frame.

highdicom is an optional dependency (``pip install "cimis[dicom]"``), imported only when a SEG is written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cimis import __version__
from cimis.data.classes import ClassSet
from cimis.data.io import PathLike, dicom_series_files, staged_output
from cimis.data.terminology import ORGAN_CODES, organ_and_side
from cimis.errors import CimisError

# SNOMED CT concepts for the segmented property category and a class name that is not a known organ.
_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_TISSUE = ("85756007", "Tissue")
_SIDE_CODES = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
_GRID_TOLERANCE = 1e-3  # in voxels: how far a source slice may lie from the label map's grid


def import_highdicom():
    """highdicom, or one clear error saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise CimisError("writing DICOM SEG needs highdicom, which is not installed",
                         'pip install "cimis[dicom]"') from None
    return highdicom


def default_seg_path(output: PathLike) -> Path:
    """``out.nii.gz`` -> ``out.seg.dcm`` beside it."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(f"{name}.seg.dcm")


def check_seg_request(source: PathLike, target: PathLike, overwrite: bool) -> None:
    """Refuse, before anything is computed or written, a SEG whose source is not a DICOM series folder or
    whose target exists (without ``overwrite``); also fails when highdicom is missing."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise CimisError(f"--dicom-seg needs a DICOM series folder as --input; {source} is not a folder",
                         "give the folder holding the source DICOM slices, or drop --dicom-seg")
    if target.is_dir():
        raise CimisError(f"cannot write DICOM SEG {target}: it is a folder", "give a file path such as out.seg.dcm")
    if target.exists() and not overwrite:
        raise CimisError(f"{target} already exists", "choose another output path or pass --overwrite")
    import_highdicom()
    with warnings.catch_warnings():  # read_image names the chosen series when there are several
        warnings.simplefilter("ignore")
        dicom_series_files(source)  # the same series read_image reads; raises when there is none


@dataclass
class SegAlgorithm:
    """What produced the segmentation, for the SEG's algorithm identification."""

    name: str  # e.g. "CIMISLearner <model folder name>"
    version: str


def write_dicom_seg(
    source: PathLike, label: sitk.Image, classes: ClassSet, path: PathLike, algorithm: SegAlgorithm,
    overwrite: bool = False,
) -> Path:
    """Write ``label`` (class values on the grid of the DICOM series in folder ``source``) as a BINARY DICOM
    SEG at ``path``, atomically. One segment per class present in ``label`` (segment numbers 1..N in class
    order), labelled with the class name and coded with the organ's SNOMED CT concept where known (generic
    "Tissue" otherwise). The SEG joins the source's study and frame of reference and references, for each
    frame, the source instance at that slice.

    Raises:
        CimisError: highdicom is missing, the source is not a DICOM series, ``label`` is not on its grid, no
            class is present, or ``path`` exists and ``overwrite`` is false.
    """
    hd = import_highdicom()
    from pydicom.sr.codedict import codes

    source = Path(source)
    instances = source_instances(source)
    frames = frames_for_instances(label, instances, source)  # (n_instances, rows, cols) class values
    present = [c for c in classes if (frames == c.value).any()]
    if not present:
        raise CimisError(f"the segmentation of {source} holds no class, so there is no DICOM SEG to write",
                         "check the input and the model; the label map was written as usual")
    to_segment = np.zeros(int(frames.max()) + 1, dtype=np.uint16)
    for number, info in enumerate(present, start=1):
        to_segment[info.value] = number
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version)
    descriptions = [segment_description(hd, number, info, algorithm_id) for number, info in enumerate(present, 1)]
    series_number = int(getattr(instances[0], "SeriesNumber", 0) or 0) + 1000
    with warnings.catch_warnings():
        # The patient's name is copied from the source as it is; a one-word name ("Anonymous") is not ours to fix.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        try:
            seg = _segmentation(hd, instances, to_segment[frames], descriptions, len(present), series_number,
                                algorithm)
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source headers
            raise CimisError(f"cannot make a DICOM SEG for the series in {source}: {exc}",
                             "check that the series' headers are complete (study, patient, frame of reference)"
                             ) from None
    path = Path(path)
    with staged_output(path, overwrite) as staged:
        seg.save_as(staged)
    return path


def _segmentation(hd, instances, segment_numbers, descriptions, count, series_number, algorithm):
    return hd.seg.Segmentation(
        source_images=instances,
        pixel_array=segment_numbers.astype(np.uint8 if count < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CIMISLearner",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"cimis {__version__}",
        device_serial_number="0",
        series_description=f"{algorithm.name} segmentation"[:64],
    )


def source_instances(folder: Path) -> list:
    """The source series' instances (pydicom datasets without pixel data), ordered by position along the
    slice normal (the SEG's frame order; each is matched to the label map by its position, not this order)."""
    import pydicom

    with warnings.catch_warnings():  # read_image names the chosen series when there are several
        warnings.simplefilter("ignore")
        files = dicom_series_files(folder)
    datasets = []
    for name in files:
        try:
            datasets.append(pydicom.dcmread(name, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise CimisError(f"cannot read DICOM file {name}: {exc}") from None
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise CimisError(f"{ds.filename} has no image position or orientation; a DICOM SEG cannot place it")
    orientation = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))


def frames_for_instances(label: sitk.Image, instances: list, source: Path) -> np.ndarray:
    """The label map's slice at each source instance, as ``(n_instances, rows, cols)``.

    Each instance is placed on the label map's grid by its position (not by file or list order): its first
    pixel must fall on index ``(0, 0, k)`` and its rows and columns must run along the grid's x and y.
    """
    values = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    direction = np.array(label.GetDirection()).reshape(3, 3)
    off_grid = CimisError(f"the label map is not on the grid of the DICOM series in {source}",
                          "segment the series itself (--input the DICOM folder) so the label map shares its grid")
    frames = []
    for ds in instances:
        orientation = np.array(ds.ImageOrientationPatient, float)
        if (int(ds.Rows), int(ds.Columns)) != values.shape[1:] or not (
                np.allclose(orientation[:3], direction[:, 0], atol=1e-4)
                and np.allclose(orientation[3:], direction[:, 1], atol=1e-4)):
            raise off_grid
        index = np.array(label.TransformPhysicalPointToContinuousIndex([float(v) for v in ds.ImagePositionPatient]))
        k = int(round(index[2]))
        if np.abs(index - [0, 0, k]).max() > _GRID_TOLERANCE or not 0 <= k < values.shape[0]:
            raise off_grid
        frames.append(values[k])
    return np.stack(frames)


def segment_description(hd, number: int, info, algorithm_id):
    """The SEG segment for one class: the organ's code where the name is a known organ, else "Tissue"."""
    organ, side = organ_and_side(info.name)
    known = ORGAN_CODES.get(organ)
    category = _ANATOMICAL_STRUCTURE if known else _TISSUE
    kind = known or _TISSUE
    lab = getattr(getattr(hd, "color", None), "CIELabColor", None)
    color = {"display_color": lab.from_rgb(*info.color)} if info.color and hasattr(lab, "from_rgb") else {}
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.name[:64],
        segmented_property_category=hd.sr.CodedConcept(category[0], "SCT", category[1]),
        segmented_property_type=hd.sr.CodedConcept(kind[0], "SCT", kind[1]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_id,
        **color,  # the class colour, where this highdicom can write one
    )
    if known and side:
        modifier = hd.sr.CodedConcept(_SIDE_CODES[side][0], "SCT", _SIDE_CODES[side][1])
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description
