"""The scene and the Slicer logics the bridge uses, inside a running Slicer or standalone on ``slicer-core``.

Inside Slicer the application owns the scene and the logics (``slicer.mrmlScene``, the Segmentations
module's logic). On ``slicer-core`` (tests, the screenshot script) :meth:`SlicerContext.standalone` sets up
the same pieces the Slicer application would: application logic with the default colour tables, and the
Segmentations logic, whose creation registers the segmentation representation converters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import slicer
import vtk


@dataclass
class SlicerContext:
    scene: "slicer.vtkMRMLScene"
    segmentations_logic: "slicer.vtkSlicerSegmentationsModuleLogic"
    application_logic: object = None

    @classmethod
    def running_slicer(cls) -> "SlicerContext":
        """The scene and logics of the Slicer application this code runs in."""
        return cls(slicer.mrmlScene, slicer.modules.segmentations.logic(), slicer.app.applicationLogic())

    @classmethod
    def standalone(cls) -> "SlicerContext":
        """A fresh scene with the logics Slicer's application would create (for ``slicer-core``)."""
        scene = slicer.vtkMRMLScene()
        for node_class in ("vtkMRMLInteractionNode", "vtkMRMLSelectionNode"):  # singletons views expect
            node = scene.CreateNodeByClass(node_class)
            node.SetSingletonTag("Singleton")
            scene.AddNode(node)
        app = slicer.vtkSlicerApplicationLogic()
        app.SetMRMLScene(scene)
        app.GetColorLogic().SetMRMLScene(scene)
        app.GetColorLogic().AddDefaultColorNodes()
        app.SetModuleLogic("Colors", app.GetColorLogic())  # the volumes logic colours new volumes through it
        app.SetSliceLogics(vtk.vtkCollection())
        app.SetViewLogics(vtk.vtkCollection())
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        segmentations.SetMRMLApplicationLogic(app)
        app.SetModuleLogic("Segmentations", segmentations)
        volumes = slicer.vtkSlicerVolumesLogic()
        volumes.SetMRMLScene(scene)
        volumes.SetMRMLApplicationLogic(app)
        app.SetModuleLogic("Volumes", volumes)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        context = cls(scene, segmentations, app)
        context._keep = [volumes]  # the logics live as long as the context
        return context


@contextlib.contextmanager
def temporary_nodes(scene, keep: list | None = None) -> Iterator[list]:
    """Remove every node added to ``scene`` inside the block (helper label maps, the colour tables Slicer's
    export adds for them), except those the caller appends to the yielded ``keep`` list; the scene ends as
    it began plus exactly the kept nodes. Nodes that were there before are never touched."""
    keep = [] if keep is None else keep
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield keep
    finally:
        kept = set()
        for node in keep:
            kept.add(node.GetID())
            for i in range(node.GetNumberOfDisplayNodes()):
                kept.add(node.GetNthDisplayNodeID(i))
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node is not None and node.GetID() not in before and node.GetID() not in kept:
                scene.RemoveNode(node)
