"""The sample CT that Slicer's Sample Data module offers under "CIMISLearner": a synthetic abdominal CT and its
organs, so that a first try needs no patient data.

The files ship in the module's ``Resources`` folder (a few hundred kB), so the Sample Data module's "download"
is a copy from a ``file://`` URI into Slicer's cache, checked against its SHA-256 like any other sample.
:func:`register_sample_data` is what the module calls once Slicer has started; it takes the Sample Data
module's logic class as an argument, because that module exists only inside the Slicer application.

The CT is the cimis phantom of seed 3 (the same synthetic patient as the user guide's pictures) at 5 mm; the
organs are its 13 reference labels as a Slicer segmentation on the CT's grid, named, coloured and coded as
the module's own results are. ``python -m cimis_slicer.sample_data`` writes the files again (the same voxels
every time) and prints their checksums, which :data:`SAMPLE_FILES` must then hold.

Registration imports nothing but the standard library: it runs at every Slicer start.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

CATEGORY = "CIMISLearner"
SAMPLE_NAME = "CIMISLearnerPhantomCT"
PHANTOM_SEED = 3
PHANTOM_SPACING_MM = 5.0
# Where the repository keeps the module's resources (the default folder the files are written to).
MODULE_RESOURCES = Path(__file__).resolve().parents[2] / "Resources"


@dataclass(frozen=True)
class SampleFile:
    relative_path: str  # under the module's Resources folder; its name is also the name in Slicer's cache
    node_name: str
    load_file_type: str  # Slicer's reader for it
    sha256: str


CT_FILE = SampleFile("SampleData/CIMISLearnerPhantomCT.nrrd", "PhantomCT", "VolumeFile",
                     "d3474b631facbccb35519ade13b629d689f3d46b3135938e9944daf27643c177")
ORGANS_FILE = SampleFile("SampleData/CIMISLearnerPhantomCT-organs.seg.nrrd", "PhantomCT organs", "SegmentationFile",
                         "83aab28822c0f274ecd382b22b7e20a4522a13f3410dc6c5ec1542fc51597890")
SAMPLE_FILES = (CT_FILE, ORGANS_FILE)
THUMBNAIL = "Icons/CIMISLearnerPhantomCT.png"  # about 260 pixels wide, as Sample Data's thumbnails are


def registration_arguments(resources: Path) -> dict:
    """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the sample CT, its
    files found in the module's ``resources`` folder."""
    resources = Path(resources).resolve()
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [(resources / f.relative_path).as_uri() for f in SAMPLE_FILES],
        "fileNames": [Path(f.relative_path).name for f in SAMPLE_FILES],
        "nodeNames": [f.node_name for f in SAMPLE_FILES],
        "checksums": [f"SHA256:{f.sha256}" for f in SAMPLE_FILES],
        "loadFileTypes": [f.load_file_type for f in SAMPLE_FILES],
        "thumbnailFileName": str(resources / THUMBNAIL),
    }


def register_sample_data(sample_data_logic, resources: Path) -> None:
    """Offer the sample CT in the Sample Data module: ``sample_data_logic`` is ``SampleData.SampleDataLogic``
    (the class: its registration methods are static). Slicer ignores a second registration of the same source."""
    register_category = getattr(sample_data_logic, "registerCustomSampleDataCategory", None)
    if register_category is not None:  # Slicer releases before April 2026 have no category titles
        register_category(CATEGORY, CATEGORY)
    sample_data_logic.registerCustomSampleDataSource(**registration_arguments(resources))


# ------------------------------------------------------------------------------------------ checking
def sample_problems(volume_node, segmentation_node) -> list[str]:
    """What is wrong with a loaded sample (the CT node and the organs' segmentation node); empty when it is
    the sample: a 3D CT in Hounsfield units and the phantom's organs on its grid. Shared by the bridge tests
    and the module's self-test, which loads the sample through Slicer's own Sample Data module."""
    import numpy as np

    from cimis.data.phantom import variant_classes
    from cimis_slicer.segments import reference_geometry, segments_of
    from cimis_slicer.volumes import array_from_volume, geometry_of

    problems = []
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA(
            "vtkMRMLLabelMapVolumeNode"):
        return [f"the CT was not loaded as a scalar volume ({volume_node!r})"]
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        return [f"the organs were not loaded as a segmentation ({segmentation_node!r})"]
    voxels = array_from_volume(volume_node)
    geometry = geometry_of(volume_node)
    if voxels.ndim != 3 or min(voxels.shape) < 2:
        problems.append(f"the CT is not a 3D volume (shape {voxels.shape})")
    if not np.allclose(geometry.spacing, PHANTOM_SPACING_MM):
        problems.append(f"the CT's spacing is {geometry.spacing}, not {PHANTOM_SPACING_MM} mm")
    # Hounsfield units: air outside the body, soft tissue inside, some bone.
    soft_tissue = float(np.mean((voxels > -200) & (voxels < 300)))
    if voxels.min() > -900 or voxels.max() < 200 or soft_tissue < 0.1:
        problems.append(f"the CT's values are not Hounsfield units (min {voxels.min()}, max {voxels.max()}, "
                        f"{soft_tissue:.0%} soft tissue)")
    painted_on = reference_geometry(segmentation_node)
    if painted_on is None or not painted_on.same_grid(geometry):
        problems.append(f"the organs are not on the CT's grid ({painted_on.describe() if painted_on else 'none'} "
                        f"against {geometry.describe()})")
    expected = [c.name for c in variant_classes("btcv")]
    names = [s.name for s in segments_of(segmentation_node)]
    if sorted(names) != sorted(expected):
        problems.append(f"the organs are {names}, not the phantom's {expected}")
    return problems


# ------------------------------------------------------------------------------------------- writing
def write_sample_volumes(resources: Path) -> list[Path]:
    """Write the CT (NRRD, gzip) and the organs (a Slicer .seg.nrrd) under ``resources``; returns the paths."""
    import SimpleITK as sitk
    import slicer

    from cimis.data.phantom import generate_phantom
    from cimis.errors import CimisError
    from cimis_slicer.context import SlicerContext
    from cimis_slicer.segments import import_label_array
    from cimis_slicer.volume_files import read_volume

    resources = Path(resources)
    ct_path, organs_path = (resources / f.relative_path for f in SAMPLE_FILES)
    ct_path.parent.mkdir(parents=True, exist_ok=True)
    phantom = generate_phantom(PHANTOM_SEED, spacing=PHANTOM_SPACING_MM)
    sitk.WriteImage(phantom.image, str(ct_path), useCompression=True)

    context = SlicerContext.standalone()
    ct = read_volume(context.scene, ct_path, CT_FILE.node_name)
    # Segment IDs are drawn from Slicer's random sequence: seeded, the file is the same byte for byte.
    slicer.vtkSegmentation.GetSegmentIDRandomSequenceInstance().SetSeed(PHANTOM_SEED)
    organs = import_label_array(context, sitk.GetArrayFromImage(phantom.label), ct, phantom.classes,
                                ORGANS_FILE.node_name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(organs_path))
    storage.SetUseCompression(True)
    context.scene.AddNode(storage)
    if not storage.WriteData(organs) or not organs_path.is_file():
        raise CimisError(f"Slicer could not write the organs to {organs_path}")
    return [ct_path, organs_path]


def write_thumbnail(resources: Path, size: int = 260) -> Path:
    """The Sample Data thumbnail: Slicer's axial view of the CT, with the organs, at the slice that shows most
    of them. Rendered offscreen (EGL or OSMesa)."""
    import numpy as np

    from cimis_slicer.context import SlicerContext
    from cimis_slicer.segments import export_label_array, segments_of
    from cimis_slicer.slice_views import SliceView, save_png
    from cimis_slicer.volumes import geometry_of

    context = SlicerContext.standalone()
    ct, organs = (load_sample_file(context, f, Path(resources) / f.relative_path) for f in SAMPLE_FILES)
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(400, 40)  # abdomen window
    labels = export_label_array(context, organs, [s.id for s in segments_of(organs)], ct)
    slice_k = int(np.argmax([len(np.unique(plane)) for plane in labels]))
    k, j, i = slice_k, labels.shape[1] / 2, labels.shape[2] / 2
    centre = (geometry_of(ct).ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
    view = SliceView(context, "Axial", (size, size))
    try:
        view.show(ct)
        view.go_to(centre)
        return save_png(view.render(), Path(resources) / THUMBNAIL)
    finally:
        view.close()


def load_sample_file(context, sample_file: SampleFile, path: Path):
    """Load one sample file as the Sample Data module does, through the reader its ``load_file_type`` names
    (Slicer's volumes reader calls ``AddArchetypeVolume``, the segmentations reader
    ``LoadSegmentationFromFile``); returns the new node."""
    from cimis.errors import CimisError

    if sample_file.load_file_type == "VolumeFile":
        node = context.application_logic.GetModuleLogic("Volumes").AddArchetypeVolume(str(path), sample_file.node_name)
    elif sample_file.load_file_type == "SegmentationFile":
        node = context.segmentations_logic.LoadSegmentationFromFile(str(path), True, sample_file.node_name)
    else:
        raise CimisError(f"no reader for the sample file type {sample_file.load_file_type!r}")
    if node is None:
        raise CimisError(f"Slicer could not read the sample file {path}")
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cimis_slicer.sample_data", description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=Path, default=MODULE_RESOURCES,
                        help=f"the module's Resources folder (default {MODULE_RESOURCES})")
    args = parser.parse_args(argv)
    from cimis.checksums import sha256_of

    written = write_sample_volumes(args.resources)
    written.append(write_thumbnail(args.resources))
    stale = False
    for path in written:
        digest = sha256_of(path)
        recorded = next((f.sha256 for f in SAMPLE_FILES if args.resources / f.relative_path == path), digest)
        stale |= digest != recorded
        print(f"{digest}  {path}  {path.stat().st_size // 1024} kB{'' if digest == recorded else '  (changed)'}")
    if stale:
        print("the checksums changed: copy them into SAMPLE_FILES (cimis_slicer/sample_data.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
