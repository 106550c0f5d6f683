"""Segmentation nodes: new structures to paint, checks before learning, label map export and import.

Slicer's Segmentations logic does the voxel work (``ExportSegmentsToLabelmapNode``,
``ImportLabelmapToSegmentationNode``); this module decides which segments, which label values, which names
and colours, and refuses what cannot be right (nothing painted, another grid) with one clear sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
import vtk

from cimis.data.classes import ClassSet, default_color
from cimis.errors import CimisError
from cimis_slicer import CLASS_VALUE_TAG, NEW_CLASS_TAG, NEW_STRUCTURE_TAG, VERSION_ATTRIBUTE
from cimis_slicer.context import SlicerContext, temporary_nodes
from cimis_slicer.terminology import set_terminology
from cimis_slicer.volumes import (VolumeGeometry, add_volume_from_array, array_from_volume,
                                  check_not_transformed, geometry_of)


@dataclass(frozen=True)
class SegmentInfo:
    id: str
    name: str
    color: tuple[int, int, int]  # 0-255, as in model cards


def segments_of(segmentation_node) -> list[SegmentInfo]:
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        color = tuple(int(round(c * 255)) for c in segment.GetColor())
        out.append(SegmentInfo(segmentation.GetNthSegmentID(i), segment.GetName(), color))
    return out


# ------------------------------------------------------------------------------------- new structures
def add_new_structures(context: SlicerContext, volume_node, names: list[str], known_classes: ClassSet | None = None,
                       segmentation_node=None):
    """Empty, named segments for the clinician to paint with the Segment Editor; returns the segmentation.

    Without ``segmentation_node`` a new one is created on the volume's grid. Names the model already knows,
    or that the segmentation already has, are refused: painting them would be ambiguous or overwrite work.
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise CimisError("no name for a new structure was given", "type the new organs' names, separated by commas")
    if len({n.lower() for n in names}) != len(names):
        raise CimisError(f"a new structure name is given twice: {', '.join(names)}")
    known = {c.name.lower(): c.name for c in (known_classes or [])}
    for name in names:
        if name.lower() in known:
            raise CimisError(f"the model already segments {known[name.lower()]!r}",
                             "only add structures the model does not know yet")
    check_not_transformed(volume_node, "volume")
    if segmentation_node is not None:
        existing = {s.name.lower() for s in segments_of(segmentation_node)}
        for name in names:
            if name.lower() in existing:
                raise CimisError(f"the segmentation {segmentation_node.GetName()!r} already has a segment {name!r}")
        check_same_grid(segmentation_node, volume_node)
    else:
        segmentation_node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                            f"{volume_node.GetName()} new structures")
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    offset = len(known_classes or []) + len(segments_of(segmentation_node))
    for i, name in enumerate(names):
        color = [c / 255 for c in default_color(offset + i)]
        segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, color)
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        segment.SetTag(NEW_STRUCTURE_TAG, "true")
        set_terminology(segment, name)
    return segmentation_node


def segments_to_learn(segmentation_node, known_classes: ClassSet) -> list[SegmentInfo]:
    """The segments that are new structures: those whose names the model does not know.

    Segments of classes the model already has (a result segmentation the clinician painted into) are never
    sent as labels: the model keeps its own knowledge of them.
    """
    known = {c.name.lower() for c in known_classes}
    return [s for s in segments_of(segmentation_node) if s.name.lower() not in known]


# ------------------------------------------------------------------------------------------- geometry
def reference_geometry(segmentation_node) -> VolumeGeometry | None:
    """The grid the segmentation is painted on (its reference image geometry), if it has one."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentation_node.GetSegmentation().GetConversionParameter(name)
    if not text:
        return None
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False):
        return None
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = image.GetExtent()
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    # A non-zero extent start shifts the grid's first voxel; express the grid from that voxel.
    ijk_to_ras[:3, 3] = ijk_to_ras[:3, :3] @ np.array(extent[0::2], dtype=float) + ijk_to_ras[:3, 3]
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    return VolumeGeometry(ijk_to_ras, shape)


def check_same_grid(segmentation_node, volume_node) -> None:
    """Refuse a segmentation painted on another grid than the volume: its voxels would not line up."""
    check_not_transformed(segmentation_node, "segmentation")
    check_not_transformed(volume_node, "volume")
    painted_on = reference_geometry(segmentation_node)
    volume = geometry_of(volume_node)
    if painted_on is not None and not painted_on.same_grid(volume):
        raise CimisError(
            f"the segmentation {segmentation_node.GetName()!r} is on a different grid ({painted_on.describe()}) "
            f"than the volume {volume_node.GetName()!r} ({volume.describe()})",
            "paint the new structures on this volume (Add new structures creates a segmentation on its grid)")


# --------------------------------------------------------------------------------------------- export
def export_label_array(context: SlicerContext, segmentation_node, segment_ids: list[str], volume_node) -> np.ndarray:
    """The chosen segments as one ``[k, j, i]`` uint8 array on the volume's grid: ``segment_ids[n]`` -> n + 1.

    Where segments overlap, the later one wins (as in Slicer's own export).
    """
    check_same_grid(segmentation_node, volume_node)
    if not segment_ids:
        return np.zeros(geometry_of(volume_node).shape, np.uint8)
    out = np.zeros(geometry_of(volume_node).shape, np.uint8)
    # One segment at a time: the value each gets does not depend on Slicer's ordering rules.
    for n, segment_id in enumerate(segment_ids, start=1):
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        with temporary_nodes(context.scene):
            label_node = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__cimis_export__")
            if not context.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, label_node,
                                                                             volume_node):
                raise CimisError(f"Slicer could not export the segment {segment_id!r} "
                                 f"of {segmentation_node.GetName()!r}")
            out[array_from_volume(label_node) > 0] = n
    return out


def painted_voxels(label_array: np.ndarray, count: int) -> list[int]:
    """Voxels painted for each of ``count`` exported segments (values 1..count)."""
    return np.bincount(label_array.ravel(), minlength=count + 1)[1:count + 1].tolist()


# --------------------------------------------------------------------------------------------- import
def import_label_array(context: SlicerContext, label_array: np.ndarray, volume_node, classes: ClassSet, name: str,
                       new_classes: list[str] = (), version: str | None = None):
    """A new segmentation node on the volume's grid with one segment per class, named and coloured from the
    model card; classes in ``new_classes`` are tagged as new. Nothing already in the scene is changed."""
    geometry = geometry_of(volume_node)
    if tuple(label_array.shape) != tuple(geometry.shape):
        raise CimisError(f"the label map has shape {label_array.shape}, the volume {volume_node.GetName()!r} "
                         f"{geometry.shape}")
    unknown = sorted(set(np.unique(label_array).tolist()) - {0} - set(classes.values))
    if unknown:
        raise CimisError(f"the label map holds values {unknown[:10]} that the model card does not list")
    dtype = np.uint8 if max(classes.values, default=0) < 256 else np.uint16
    with temporary_nodes(context.scene) as keep:
        colors = context.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__cimis_colors__")
        colors.SetTypeToUser()
        colors.SetNumberOfColors(max(classes.values, default=0) + 1)
        colors.SetColor(0, "background", 0, 0, 0, 0)
        for c in classes:
            rgb = c.color or (128, 128, 128)
            colors.SetColor(c.value, c.name, rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, 1.0)
        label_node = add_volume_from_array(context.scene, label_array.astype(dtype), geometry.ijk_to_ras,
                                           "__cimis_import__", label_map=True)
        label_node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        segmentation_node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if not context.segmentations_logic.ImportLabelmapToSegmentationNode(label_node, segmentation_node):
            raise CimisError(f"Slicer could not import the label map of {volume_node.GetName()!r} as segments")
        _finish_segments(segmentation_node, classes, {n.lower() for n in new_classes})
        if version:
            segmentation_node.SetAttribute(VERSION_ATTRIBUTE, version)
        keep.append(segmentation_node)  # only once it is complete: a failure leaves no half-made node
    return segmentation_node


def _finish_segments(segmentation_node, classes: ClassSet, new_names: set[str]) -> None:
    """Tag each imported segment with its class value, newness and standard organ code; add empty segments
    for absent classes, so the list always shows every class the model knows."""
    segmentation = segmentation_node.GetSegmentation()
    present = {s.name: s.id for s in segments_of(segmentation_node)}
    for c in classes:
        segment_id = present.get(c.name)
        if segment_id is None:
            rgb = c.color or (128, 128, 128)
            segment_id = segmentation.AddEmptySegment("", c.name, [x / 255 for x in rgb])
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(CLASS_VALUE_TAG, str(c.value))
        segment.SetTag(NEW_CLASS_TAG, "true" if c.name.lower() in new_names else "false")
        set_terminology(segment, c.name)


def paint_segment(context: SlicerContext, segmentation_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """Replace a segment's voxels by ``mask`` (``[k, j, i]`` on the volume's grid), as a Segment Editor stroke
    would; used by the self-test and the screenshots to paint without a mouse."""
    geometry = geometry_of(volume_node)
    if tuple(mask.shape) != tuple(geometry.shape):
        raise CimisError(f"the mask has shape {mask.shape}, the volume {geometry.shape}")
    with temporary_nodes(context.scene):
        label_node = add_volume_from_array(context.scene, (mask > 0).astype(np.uint8), geometry.ijk_to_ras,
                                           "__cimis_paint__", label_map=True)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not context.segmentations_logic.ImportLabelmapToSegmentationNode(label_node, segmentation_node, ids):
            raise CimisError(f"Slicer could not paint the segment {segment_id!r}")


def segment_tag(segmentation_node, segment_id: str, tag: str) -> str | None:
    """A segment's tag value, or None (vtkSegment.GetTag returns it through an out-parameter)."""
    value = vtk.reference("")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return str(value) if segment is not None and segment.GetTag(tag, value) else None
