"""Volumes and label maps <-> files, through Slicer's own storage nodes.

Slicer writes NRRD and NIfTI with the RAS-to-LPS conversion the engine (SimpleITK) expects, so a volume
written here and a label map the worker writes back line up voxel for voxel with the node in the scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer

from cimis.errors import CimisError
from cimis_slicer.context import temporary_nodes
from cimis_slicer.volumes import GRID_TOLERANCE_MM, VolumeGeometry, add_volume_from_array, array_from_volume, geometry_of


def write_volume(scene, volume_node, path: Path) -> Path:
    """Write the volume node's voxels and geometry to ``path`` (.nrrd, .nii.gz, ...); the node is not changed:
    a temporary storage node is used, not the node's own (which would change where Slicer saves it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # gzip of a 512^3 CT takes seconds on the GUI thread; these files are temporary
    scene.AddNode(storage)
    try:
        if not storage.WriteData(volume_node) or not path.is_file():
            raise CimisError(f"Slicer could not write {volume_node.GetName()!r} to {path}",
                             "check that the folder is writable and the disk not full")
    finally:
        scene.RemoveNode(storage)
    return path


def write_label_array(scene, label_array: np.ndarray, geometry: VolumeGeometry, path: Path) -> Path:
    """Write a label array on ``geometry`` to ``path`` through a temporary label map node."""
    with temporary_nodes(scene):
        node = add_volume_from_array(scene, label_array, geometry.ijk_to_ras, "__cimis_label__", label_map=True)
        return write_volume(scene, node, path)


def read_volume(scene, path: Path, name: str | None = None):
    """A new scalar volume node holding the image file at ``path`` (what Slicer's Add Data does)."""
    path = Path(path)
    if not path.exists():
        raise CimisError(f"the volume {path} does not exist")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    try:
        if not storage.ReadData(node) or node.GetImageData() is None:
            scene.RemoveNode(node)
            raise CimisError(f"Slicer could not read the volume {path}")
    finally:
        scene.RemoveNode(storage)
    node.CreateDefaultDisplayNodes()
    return node


def read_label_array(scene, path: Path, expected: VolumeGeometry) -> np.ndarray:
    """The label map at ``path`` as an integer ``[k, j, i]`` array, refused unless it lies on ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise CimisError(f"the label map {path} does not exist")
    with temporary_nodes(scene):
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__cimis_read__")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        scene.AddNode(storage)
        if not storage.ReadData(node) or node.GetImageData() is None:
            raise CimisError(f"Slicer could not read the label map {path}")
        found = geometry_of(node)
        if not found.same_grid(expected, tol_mm=max(GRID_TOLERANCE_MM, 1e-4 * max(expected.spacing))):
            raise CimisError(f"the label map {path} is on another grid ({found.describe()}) than its volume "
                             f"({expected.describe()})")
        return array_from_volume(node)
