"""Shared fixtures for the engine tests: tiny synthetic volumes with chosen geometry."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

# A proper rotation (oblique, right-handed) and an axis flip that keeps the grid right-handed (like LPS vs RAS).
_c, _s = math.cos(0.3), math.sin(0.3)
_ROTATION = np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, _c, -_s], [0, _s, _c]])
OBLIQUE = tuple(float(x) for x in _ROTATION.ravel())
DIRECTIONS = {
    "identity": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "oblique": OBLIQUE,
    "flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    "left-handed": (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0),  # y and z swapped: determinant -1
}


@pytest.fixture
def make_image() -> Callable[..., sitk.Image]:
    """Factory for a 3D image from a (z, y, x) array (default: an 8x10x12 ramp) with the given geometry.

    ``direction`` is a 9-tuple or one of the names in ``DIRECTIONS``.
    """

    def make(
        array: np.ndarray | None = None,
        spacing: Sequence[float] = (0.7, 0.9, 2.5),
        origin: Sequence[float] = (10.5, -20.25, 33.125),
        direction: Sequence[float] | str = "oblique",
        dtype=np.int16,
    ) -> sitk.Image:
        if array is None:
            array = (np.arange(8 * 10 * 12).reshape(8, 10, 12) % 300 - 100).astype(dtype)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetOrigin(tuple(float(o) for o in origin))
        image.SetDirection(DIRECTIONS[direction] if isinstance(direction, str) else tuple(float(d) for d in direction))
        return image

    return make
