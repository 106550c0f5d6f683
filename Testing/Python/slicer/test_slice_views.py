"""Offscreen slice views (EGL, no display) show the old and new segments in their colours where they are."""

from __future__ import annotations

import numpy as np
import pytest

from cimis.data.classes import ClassInfo, ClassSet
from cimis_slicer.segments import import_label_array
from cimis_slicer.slice_views import SliceView, save_png
from cimis_slicer.volumes import geometry_of


def _central_voxel_ras(volume, mask: np.ndarray) -> np.ndarray:
    """The RAS centre of the mask's voxel nearest its centroid (a voxel surely inside the organ)."""
    voxels = np.argwhere(mask)
    k, j, i = voxels[np.argmin(np.linalg.norm(voxels - voxels.mean(axis=0), axis=1))]
    return (geometry_of(volume).ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


@pytest.mark.parametrize("orientation", ["Axial", "Coronal"])
def test_overlay_colours_appear_where_the_segments_are(context, ct, phantom_files, tmp_path, orientation):
    labels, all_classes = phantom_files["labels"], phantom_files["classes"]
    # An old organ (liver) and a new one (stomach) in deliberately distinct colours.
    classes = ClassSet([ClassInfo("liver", all_classes.by_name("liver").value, (0, 0, 255)),
                        ClassInfo("stomach", all_classes.by_name("stomach").value, (255, 255, 0))])
    result = np.where(np.isin(labels, classes.values), labels, 0).astype(np.uint8)
    segmentation = import_label_array(context, result, ct, classes, "CT segmentation", ["stomach"], "v0002")
    segmentation.GetDisplayNode().SetOpacity2DFill(1.0)  # pure colours make the check exact

    view = SliceView(context, orientation, (240, 240))
    try:
        view.show(ct)
        for name, colour in (("liver", (0, 0, 255)), ("stomach", (255, 255, 0))):
            # A voxel inside the organ, on the slice through it, must show the organ's colour.
            ras = _central_voxel_ras(ct, result == classes.by_name(name).value)
            view.go_to(ras)
            pixels = view.render()
            row, col = view.ras_to_pixel(view.slice_ras_point(ras))
            patch = pixels[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2].reshape(-1, 3).astype(int)
            assert np.abs(patch - np.array(colour)).sum(axis=1).min() <= 30, (name, patch)
            # ...and the colour appears nowhere without that segment: compare with the view without overlay.
            segmentation.GetDisplayNode().SetVisibility(False)
            plain = view.render()
            segmentation.GetDisplayNode().SetVisibility(True)
            coloured = np.abs(pixels.astype(int) - np.array(colour)).sum(axis=2) <= 30
            assert coloured.any() and not (np.abs(plain.astype(int) - np.array(colour)).sum(axis=2) <= 30).any()
        save_png(pixels, tmp_path / "view.png")
        assert (tmp_path / "view.png").stat().st_size > 1000
    finally:
        view.close()
