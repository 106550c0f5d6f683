"""CIMISLearner engine: class-incremental 3D CT segmentation.

Imports torch, MONAI, SimpleITK and numpy only; never slicer, vtk or qt (see docs/architecture.md).
"""

__version__ = "0.1.0"
