"""Input checks: each passes on good input and raises CimisError, naming the file, on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.classes import btcv_classes, ClassSet
from cimis.data.validation import (
    MEMORY_LIMIT_ENV,
    available_memory_bytes,
    check_3d,
    check_finite,
    check_fits_in_memory,
    check_integer_labels,
    check_label_values,
    check_not_empty,
    check_same_geometry,
    format_bytes,
    label_values,
)
from cimis.errors import CimisError


def test_check_3d(make_image):
    check_3d(make_image(), "ct.nii.gz")
    check_3d(make_image(np.zeros((1, 10, 12), np.int16)), "ct.nii.gz")  # a singleton axis is fine
    with pytest.raises(CimisError, match=r"slice\.png is a 2D image"):
        check_3d(sitk.Image(12, 10, sitk.sitkInt16), "slice.png")
    with pytest.raises(CimisError, match=r"cine\.nii is a 4D image"):
        check_3d(sitk.Image([12, 10, 8, 3], sitk.sitkInt16), "cine.nii")
    with pytest.raises(CimisError, match="3 values per voxel"):
        check_3d(sitk.Image([12, 10, 8], sitk.sitkVectorUInt8, 3), "rgb.nrrd")


@pytest.mark.parametrize("bad, count", [(np.nan, "2 NaN and 0 infinite"), (np.inf, "0 NaN and 2 infinite")])
def test_check_finite(make_image, bad, count):
    values = np.zeros((8, 10, 12), np.float32)
    check_finite(make_image(values), "ct.nii.gz")
    check_finite(make_image(), "ct.nii.gz")  # integer images
    values[0, 0, :2] = bad
    with pytest.raises(CimisError, match=f"ct.nii.gz has {count} voxels"):
        check_finite(make_image(values), "ct.nii.gz")


def test_check_same_geometry(make_image):
    image = make_image(origin=(-187.34567891, 230.1234567, -1023.4567891))
    check_same_geometry(image, make_image(origin=image.GetOrigin()), "ct.nii.gz", "seg.nii.gz")
    # Float32 rounding of the origin (as in NIfTI headers) is tolerated.
    rounded = tuple(float(np.float32(o)) for o in image.GetOrigin())
    assert rounded != image.GetOrigin()
    check_same_geometry(image, make_image(origin=rounded), "ct.nii.gz", "seg.nii.gz")
    for other in (
        make_image(origin=(0, 0, 0)),
        make_image(spacing=(1, 1, 1)),
        make_image(direction="identity"),
        make_image(np.zeros((8, 10, 13), np.uint8)),
    ):
        with pytest.raises(CimisError, match="label seg.nii.gz is not on the grid of image ct.nii.gz") as info:
            check_same_geometry(image, other, "ct.nii.gz", "seg.nii.gz")
        assert info.value.message.count("size ") == 2  # both geometries are listed


def test_check_label_values():
    classes = btcv_classes()
    check_label_values(np.array([[0, 1], [13, 6]], np.uint8), classes, "seg.nii.gz")
    check_label_values(np.array([0.0, 1.0, 13.0]), classes, "seg.nii.gz")  # float maps with integer values
    with pytest.raises(CimisError, match=r"seg.nii.gz has values \[14, 200\] outside the class list") as info:
        check_label_values(np.array([0, 14, 200, 3], np.uint8), classes, "seg.nii.gz")
    assert "13" in info.value.message  # the allowed values are listed
    with pytest.raises(CimisError, match=r"\[1.5\]"):
        check_label_values(np.array([0.0, 1.5]), classes, "seg.nii.gz")
    with pytest.raises(CimisError, match=r"\[-1\]"):
        check_label_values(np.array([-1, 0], np.int16), classes, "seg.nii.gz")
    sparse = ClassSet.from_names(["liver", "tumour"], first_value=10)
    check_label_values(np.array([0, 10, 11]), sparse, "x")
    with pytest.raises(CimisError):
        check_label_values(np.array([1]), sparse, "x")


def test_check_integer_labels_and_label_values():
    check_integer_labels(np.array([0, 1, 300], np.uint16), "seg.nii.gz")
    check_integer_labels(np.array([0.0, 5.0]), "seg.nii.gz")
    for bad in (np.array([0.5]), np.array([-2], np.int8), np.array([np.nan])):
        with pytest.raises(CimisError, match="seg.nii.gz has values"):
            check_integer_labels(bad, "seg.nii.gz")
    assert label_values(np.array([3, 0, 3, 1], np.uint8)).tolist() == [0, 1, 3]
    assert label_values(np.array([3.0, -1.0, 3.0])).tolist() == [-1.0, 3.0]


def test_check_not_empty():
    check_not_empty(np.array([0, 0, 2]), "seg.nii.gz")
    with pytest.raises(CimisError, match="seg.nii.gz has no foreground voxel"):
        check_not_empty(np.zeros((4, 4, 4), np.uint8), "seg.nii.gz")


def test_memory_checks(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    assert available_memory_bytes() > 0
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(1_000_000_000))
    assert available_memory_bytes() == 1_000_000_000
    check_fits_in_memory(700_000_000, "loading case 0001", "use a coarser spacing")
    with pytest.raises(CimisError, match=r"loading case 0001 needs about 858.3 MiB of memory but only 953.7") as info:
        check_fits_in_memory(900_000_000, "loading case 0001", "use a coarser spacing")
    assert info.value.hint == "use a coarser spacing"
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(CimisError, match=MEMORY_LIMIT_ENV):
        available_memory_bytes()
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**30) == "3.0 GiB"
