"""Volume nodes <-> arrays and files keep the full geometry (oblique directions, anisotropic spacing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.errors import CimisError
from cimis_slicer.segments import add_new_structures, check_same_grid, reference_geometry
from cimis_slicer.volume_files import read_label_array, read_volume, write_label_array, write_volume
from cimis_slicer.volumes import add_volume_from_array, array_from_volume, geometry_of

_c, _s = math.cos(0.4), math.sin(0.4)
OBLIQUE = np.array([[_c * 0.7, -_s * 0.9, 0, 12.5], [_s * 0.7, _c * 0.9, 0, -30.0], [0, 0, 2.5, 41.0], [0, 0, 0, 1]])


def test_array_and_geometry_round_trip(context):
    array = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 97).astype(np.int16)
    node = add_volume_from_array(context.scene, array, OBLIQUE, "oblique")
    geometry = geometry_of(node)
    assert geometry.shape == (6, 7, 8)
    assert geometry.spacing == pytest.approx((0.7, 0.9, 2.5))
    assert geometry.origin == pytest.approx((12.5, -30.0, 41.0))
    assert np.allclose(geometry.ijk_to_ras, OBLIQUE)
    copy = array_from_volume(node)
    copy[:] = 0  # a copy: the node keeps its voxels
    assert np.array_equal(array_from_volume(node), array)


def test_files_written_through_slicer_line_up_for_the_engine(context, tmp_path):
    array = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 97).astype(np.int16)
    node = add_volume_from_array(context.scene, array, OBLIQUE, "oblique")
    path = write_volume(context.scene, node, tmp_path / "ct.nrrd")
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    # SimpleITK is LPS: the first two axes of RAS flip sign.
    lps = np.diag([-1.0, -1.0, 1.0]) @ OBLIQUE[:3, 3]
    assert image.GetOrigin() == pytest.approx(tuple(lps))
    assert image.GetSpacing() == pytest.approx((0.7, 0.9, 2.5))
    # ...and a label map written back by the engine reads onto the same grid; another grid is refused.
    label = write_label_array(context.scene, (array > 50).astype(np.uint8), geometry_of(node), tmp_path / "l.nii.gz")
    assert np.array_equal(read_label_array(context.scene, label, geometry_of(node)), array > 50)
    shifted = sitk.ReadImage(str(label))
    shifted.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    nodes_before = context.scene.GetNumberOfNodes()
    with pytest.raises(CimisError, match="another grid"):
        read_label_array(context.scene, tmp_path / "shifted.nii.gz", geometry_of(node))
    assert context.scene.GetNumberOfNodes() == nodes_before
    assert read_volume(context.scene, path, "again").GetName() == "again"


def test_segmentation_on_another_grid_is_refused(context, ct):
    segmentation = add_new_structures(context, ct, ["pancreas"])
    assert reference_geometry(segmentation).same_grid(geometry_of(ct))
    check_same_grid(segmentation, ct)
    other = add_volume_from_array(context.scene, np.zeros((5, 5, 5), np.int16), OBLIQUE, "other")
    with pytest.raises(CimisError, match="different grid"):
        check_same_grid(segmentation, other)
    with pytest.raises(CimisError, match="already has a segment"):
        add_new_structures(context, ct, ["Pancreas"], segmentation_node=segmentation)
