"""Volume IO: round trips keep voxels and geometry; bad paths and existing outputs raise CimisError."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.io import (
    copy_geometry,
    geometry_summary,
    read_image,
    same_geometry,
    staged_output,
    write_dicom_series,
    write_image,
)
from cimis.errors import CimisError


def assert_same(a: sitk.Image, b: sitk.Image, atol: float = 0.0) -> None:
    assert same_geometry(a, b), f"{geometry_summary(a)} != {geometry_summary(b)}"
    np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=atol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", ["identity", "oblique", "flipped", "left-handed"])
def test_file_round_trip_keeps_voxels_and_geometry(tmp_path, make_image, suffix, direction):
    image = make_image(direction=direction)
    path = write_image(image, tmp_path / "sub" / f"vol{suffix}")
    back = read_image(path)
    assert back.GetPixelID() == image.GetPixelID()
    assert_same(image, back)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


@pytest.mark.parametrize("direction", ["identity", "oblique", "flipped"])
def test_dicom_round_trip_keeps_voxels_and_geometry(tmp_path, make_image, direction):
    image = make_image(direction=direction)
    folder = write_dicom_series(image, tmp_path / "series")
    assert len(list(folder.glob("*.dcm"))) == image.GetSize()[2]
    assert_same(image, read_image(folder))


def test_dicom_round_trip_of_float_and_wide_integer_images(tmp_path, make_image):
    rng = np.random.default_rng(0)
    floats = make_image(rng.normal(0, 1000, (8, 10, 12)).astype(np.float32))
    back = read_image(write_dicom_series(floats, tmp_path / "f"))
    span = float(np.ptp(sitk.GetArrayViewFromImage(floats)))
    assert_same(floats, back, atol=span / 60000)  # quantised to int16 through the rescale slope

    wide = make_image(rng.integers(0, 60000, (8, 10, 12)).astype(np.int32))
    assert_same(wide, read_image(write_dicom_series(wide, tmp_path / "w")))  # exact through an integer intercept


def test_dicom_left_handed_grid_is_written_reversed_with_a_warning(tmp_path, make_image):
    image = make_image(direction="left-handed")
    with pytest.warns(UserWarning, match="left-handed"):
        folder = write_dicom_series(image, tmp_path / "s")
    back = read_image(folder)
    assert_same(image, sitk.Flip(back, [False, False, True]))  # same voxels in space


def test_dicom_folder_with_several_series_reads_the_largest(tmp_path, make_image):
    big = make_image()
    small = make_image(sitk.GetArrayFromImage(big)[:3])
    write_dicom_series(big, tmp_path / "a")
    write_dicom_series(small, tmp_path / "b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in (tmp_path / "a", tmp_path / "b"):
        for f in source.iterdir():
            f.rename(mixed / f"{source.name}_{f.name}")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        back = read_image(mixed)
    assert back.GetSize() == big.GetSize()


def test_refuses_to_overwrite_unless_asked(tmp_path, make_image):
    image = make_image()
    path = write_image(image, tmp_path / "v.nii.gz")
    with pytest.raises(CimisError, match="already exists"):
        write_image(make_image(direction="identity"), path)
    assert same_geometry(read_image(path), image)  # untouched
    write_image(make_image(direction="identity"), path, overwrite=True)
    assert not same_geometry(read_image(path), image)

    folder = write_dicom_series(image, tmp_path / "s")
    with pytest.raises(CimisError, match="not empty"):
        write_dicom_series(image, folder)
    write_dicom_series(make_image(direction="identity"), folder, overwrite=True)
    assert len(list(folder.iterdir())) == image.GetSize()[2]


def test_failed_write_leaves_nothing_behind(tmp_path, make_image):
    with pytest.raises(CimisError, match="cannot write"):
        write_image(make_image(), tmp_path / "v.unknownformat")
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x1f\x8b\x08garbage"])
def test_corrupt_file_raises_cimis_error(tmp_path, content):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(CimisError, match="bad.nii.gz"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_truncated_file_raises_cimis_error(tmp_path, make_image, suffix, kept):
    # ITK's NIfTI reader would fill the missing voxels with zeros without complaint.
    data = write_image(make_image(), tmp_path / f"good{suffix}").read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(CimisError, match=f"cut{suffix}"):
        read_image(path)


def test_missing_path_and_empty_or_non_dicom_folder(tmp_path):
    with pytest.raises(CimisError, match="does not exist"):
        read_image(tmp_path / "nope.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CimisError, match="is empty"):
        read_image(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(CimisError, match="no DICOM series"):
        read_image(tmp_path / "notes")


def test_geometry_helpers(make_image):
    a = make_image()
    b = make_image(origin=(10.5, -20.25, 33.2))
    assert same_geometry(a, make_image())
    assert not same_geometry(a, b)
    assert not same_geometry(a, make_image(spacing=(0.7, 0.9, 2.6)))
    assert not same_geometry(a, make_image(np.zeros((8, 10, 11), np.int16)))
    assert "size 12x10x8" in geometry_summary(a) and "spacing 0.7x0.9x2.5" in geometry_summary(a)
    assert "direction" not in geometry_summary(make_image(direction="identity"))
    assert same_geometry(a, copy_geometry(a, b))
    with pytest.raises(CimisError):
        copy_geometry(a, make_image(np.zeros((2, 2, 2), np.int16)))
