"""``python -m cimis_slicer.screenshots --out docs/images``: the user guide's pictures, rendered by Slicer.

Each picture is the Axial, Coronal and Sagittal slice views of a synthetic abdominal CT (cimis phantom),
rendered offscreen by Slicer's slice logic and segmentation displayable manager, the way the module shows
them. With ``--registry`` the "before" and "after" segmentations come from that registry's active version
and the one before it; without it, the phantom's reference labels stand in for a model's output (the guide
says so), so the pictures can be made in seconds on any machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from cimis.data.classes import ClassSet
from cimis.data.phantom import generate_phantom
from cimis_slicer.context import SlicerContext
from cimis_slicer.segments import add_new_structures, import_label_array, paint_segment, segments_of
from cimis_slicer.slice_views import ORIENTATIONS, SliceView, save_png
from cimis_slicer.volume_files import read_volume
from cimis_slicer.volumes import geometry_of

OLD_CLASSES = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach"]
NEW_CLASS = "pancreas"
PREFIX = "slicer_"


def _views(context, volume, focus_ras, size=(340, 340)) -> np.ndarray:
    pictures = []
    for orientation in ORIENTATIONS:
        view = SliceView(context, orientation, size)
        try:
            view.show(volume)
            view.go_to(focus_ras)
            pictures.append(view.render())
        finally:
            view.close()
    gap = np.full((size[1], 4, 3), 255, np.uint8)
    return np.concatenate([pictures[0], gap, pictures[1], gap, pictures[2]], axis=1)


def make_screenshots(out: Path, spacing: float = 2.5) -> list[Path]:
    import SimpleITK as sitk

    out = Path(out)
    context = SlicerContext.standalone()
    phantom = generate_phantom(3, spacing=(spacing, spacing, spacing))
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(phantom.image, str(Path(tmp) / "ct.nii.gz"))
        ct = read_volume(context.scene, Path(tmp) / "ct.nii.gz", "CT")
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(400, 40)
    labels = sitk.GetArrayFromImage(phantom.label)
    old = phantom.classes.subset(OLD_CLASSES)
    new = phantom.classes.subset([NEW_CLASS])
    new_mask = labels == new[0].value
    voxels = np.argwhere(new_mask)
    k, j, i = voxels[np.argmin(np.linalg.norm(voxels - voxels.mean(axis=0), axis=1))]
    focus = (geometry_of(ct).ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
    written = []

    # 1. What the current model segments: the old organs.
    before = import_label_array(context, np.where(np.isin(labels, old.values), labels, 0).astype(np.uint8), ct, old,
                                "CT segmentation v0001", version="v0001")
    written.append(save_png(_views(context, ct, focus), out / f"{PREFIX}1_segment.png"))

    # 2. The clinician paints only the new organ (the old result hidden, as one would while painting).
    before.GetDisplayNode().SetVisibility(False)
    painted = add_new_structures(context, ct, [NEW_CLASS], old)
    paint_segment(context, painted, segments_of(painted)[0].id, new_mask, ct)
    written.append(save_png(_views(context, ct, focus), out / f"{PREFIX}2_paint_new.png"))

    # 3. After Learn: the new version segments old and new organs together.
    painted.GetDisplayNode().SetVisibility(False)
    both = ClassSet(list(old) + list(new))
    import_label_array(context, np.where(np.isin(labels, both.values), labels, 0).astype(np.uint8), ct, both,
                       "CT segmentation v0002", [NEW_CLASS], "v0002")
    written.append(save_png(_views(context, ct, focus), out / f"{PREFIX}3_old_and_new.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cimis_slicer.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images", help="folder for the PNG files (default docs/images)")
    args = parser.parse_args(argv)
    for path in make_screenshots(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
