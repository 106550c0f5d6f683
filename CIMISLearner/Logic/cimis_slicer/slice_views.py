"""Slice views rendered offscreen by Slicer's own slice logic and displayable managers (no display needed).

What Slicer's Red/Yellow/Green views show: the background volume resliced by ``vtkMRMLSliceLogic`` and
segmentations drawn by ``vtkMRMLSegmentationsDisplayableManager2D`` (fill and outline). Used for the user
guide's screenshots and by tests that check the overlay colours appear where the segments are. Without a
display, VTK renders through EGL (or OSMesa).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

if not os.environ.get("DISPLAY") and os.name == "posix":
    # Without an X display VTK's default window would fail to connect; EGL renders offscreen.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

from cimis_slicer.context import SlicerContext  # noqa: E402

ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
_VIEW_NAMES = {"Axial": "Red", "Coronal": "Green", "Sagittal": "Yellow"}
_views_made = 0  # each view gets its own slice node: two logics on one node would fight over it


class SliceView:
    """One offscreen slice view of ``context``'s scene (like Slicer's Red, Green or Yellow view)."""

    def __init__(self, context: SlicerContext, orientation: str = "Axial", size: tuple[int, int] = (400, 400)):
        if context.application_logic is None:
            raise ValueError("slice views need the application logic: use SlicerContext.standalone()")
        self.size = size
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        # The resliced, window/levelled volume is already an RGBA image: show it 1:1 behind everything.
        self.image_mapper = vtk.vtkImageMapper()
        self.image_mapper.SetColorWindow(255)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(context.application_logic)
        for manager in ("vtkMRMLSegmentationsDisplayableManager2D",):
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(context.application_logic)
        context.application_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(context.scene)
        global _views_made
        _views_made += 1
        self.context = context
        self.node = self.logic.AddSliceNode(f"{_VIEW_NAMES.get(orientation, orientation)}{_views_made}")
        self.managers.SetMRMLDisplayableNode(self.node)
        self.node.SetOrientation(orientation)
        self.logic.ResizeSliceNode(*size)

    def show(self, volume_node, offset_mm: float | None = None) -> None:
        """Show ``volume_node`` as background, fitted to the view, at ``offset_mm`` (default: its centre)."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.FitSliceToBackground()
        if offset_mm is not None:
            self.logic.SetSliceOffset(offset_mm)
        self.logic.SnapSliceOffsetToIJK()
        self.image_mapper.SetInputConnection(self.logic.GetImageDataConnection())

    def render(self) -> np.ndarray:
        """The view as an RGB ``[row, column, 3]`` uint8 array, top row first."""
        self.image_mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])

    def ras_to_pixel(self, ras) -> tuple[int, int]:
        """Where a RAS point (on the current slice) lands in :meth:`render`'s array, as (row, column)."""
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(self.node.GetXYToRAS())
        xy_to_ras.Invert()
        x, y, _, _ = xy_to_ras.MultiplyPoint([float(ras[0]), float(ras[1]), float(ras[2]), 1.0])
        return int(round(self.size[1] - 1 - y)), int(round(x))

    def slice_normal(self) -> np.ndarray:
        return slicer.util.arrayFromVTKMatrix(self.node.GetSliceToRAS())[:3, 2]

    def go_to(self, ras) -> None:
        """Move the slice through the RAS point ``ras`` (snapped to the volume's voxel planes)."""
        self.logic.SetSliceOffset(float(np.dot(self.slice_normal(), np.asarray(ras, dtype=float))))
        self.logic.SnapSliceOffsetToIJK()

    def slice_ras_point(self, ras) -> np.ndarray:
        """``ras`` moved onto the current slice plane (for picking pixels)."""
        slice_to_ras = slicer.util.arrayFromVTKMatrix(self.node.GetSliceToRAS())
        normal, origin = slice_to_ras[:3, 2], slice_to_ras[:3, 3]
        ras = np.asarray(ras, dtype=float)
        return ras - np.dot(ras - origin, normal) * normal

    def close(self) -> None:
        """Release the window and take the view's own nodes (slice and composite node) out of the scene."""
        self.managers.SetMRMLDisplayableNode(None)
        self.context.application_logic.GetSliceLogics().RemoveItem(self.logic)
        composite = self.logic.GetSliceCompositeNode()
        self.logic.SetMRMLScene(None)
        for node in (composite, self.node):
            if node is not None and node.GetScene() is not None:
                node.GetScene().RemoveNode(node)
        self.window.Finalize()


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """Write an RGB array as PNG through VTK (no extra imaging library)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    array = numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True,
                                                array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(array)
    writer = vtk.vtkPNGWriter()
    writer.SetInputData(image)
    writer.SetFileName(str(path))
    writer.Write()
    return path


def render_views(context: SlicerContext, volume_node, orientations=ORIENTATIONS, size=(360, 360),
                 focus_ras=None) -> list[np.ndarray]:
    """One rendered picture per orientation, side by side material for a screenshot; ``focus_ras`` picks
    the slices (default: the volume's centre)."""
    pictures = []
    for orientation in orientations:
        view = SliceView(context, orientation, size)
        try:
            view.show(volume_node)
            if focus_ras is not None:
                view.go_to(focus_ras)
            pictures.append(view.render())
        finally:
            view.close()
    return pictures
