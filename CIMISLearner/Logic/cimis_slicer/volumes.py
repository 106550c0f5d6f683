"""Volume nodes <-> numpy arrays, with the full voxel geometry (IJK-to-RAS: spacing, origin, directions).

Arrays are ``[k, j, i]`` like ``slicer.util.arrayFromVolume``; the geometry is the node's 4x4 IJK-to-RAS
matrix, whose columns are the axis directions scaled by the spacing and whose last column is the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
import slicer.util
import vtk

from cimis.errors import CimisError

# Two grids are the same when voxel centres agree to this many millimetres across the volume.
GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class VolumeGeometry:
    """A voxel grid in RAS: the IJK-to-RAS matrix and the array shape ``(k, j, i)``."""

    ijk_to_ras: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(o) for o in self.ijk_to_ras[:3, 3])

    @property
    def directions(self) -> np.ndarray:
        """3x3, one unit column per voxel axis (i, j, k) in RAS."""
        return self.ijk_to_ras[:3, :3] / np.array(self.spacing)

    def same_grid(self, other: "VolumeGeometry", tol_mm: float = GRID_TOLERANCE_MM) -> bool:
        """Same shape and the same position of every voxel centre (checked at the grid's corners)."""
        if tuple(self.shape) != tuple(other.shape):
            return False
        corners = np.array([[i, j, k, 1.0] for i in (0, self.shape[2] - 1) for j in (0, self.shape[1] - 1)
                            for k in (0, self.shape[0] - 1)]).T
        return bool(np.abs(self.ijk_to_ras @ corners - other.ijk_to_ras @ corners).max() <= tol_mm)

    def describe(self) -> str:
        size = "x".join(str(n) for n in reversed(self.shape))
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:g}" for o in self.origin)
        return f"{size} voxels of {spacing} mm at ({origin})"


def ijk_to_ras_of(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def geometry_of(volume_node) -> VolumeGeometry:
    image = volume_node.GetImageData()
    if image is None:
        raise CimisError(f"the volume {volume_node.GetName()!r} holds no voxels", "load the CT again")
    return VolumeGeometry(ijk_to_ras_of(volume_node), tuple(reversed(image.GetDimensions())))


def array_from_volume(volume_node) -> np.ndarray:
    """A copy of the voxels, ``[k, j, i]`` (the copy may outlive the node and never changes it)."""
    geometry_of(volume_node)  # a clear error for a node without voxels
    return np.array(slicer.util.arrayFromVolume(volume_node), copy=True)


def add_volume_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str,
                          label_map: bool = False):
    """A new scalar (or label map) volume node in ``scene`` holding a copy of ``array`` on ``ijk_to_ras``."""
    if array.ndim != 3:
        raise CimisError(f"a volume needs a 3D array, got shape {array.shape}")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def check_not_transformed(node, what: str) -> None:
    """The bridge works in the nodes' own coordinates; a node under a transform would be misplaced."""
    if node.GetParentTransformNode() is not None:
        raise CimisError(f"the {what} {node.GetName()!r} is under the transform "
                         f"{node.GetParentTransformNode().GetName()!r}",
                         "harden the transform (Data module, right-click > Harden transform) and try again")
