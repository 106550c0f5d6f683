"""Volume IO: round trips keep voxels and geometry; bad paths and existing outputs raise CimisError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.io import (
    check_id_as_file_name,
    copy_geometry,
    csv_writer_atomic,
    geometry_summary,
    read_image,
    same_geometry,
    staged_output,
    write_dicom_series,
    write_image,
    write_json_atomic,
    write_text_atomic,
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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("kept", [0.0, 0.5])
def test_a_write_the_disk_cut_short_never_replaces_the_existing_file(tmp_path, make_image, monkeypatch, suffix, kept):
    """ITK's NIfTI writer reports no error when the disk fills up and leaves a short (or empty) file; the
    write must fail with a CimisError and leave the good file there as it was (issue 14, item 1)."""
    target = write_image(make_image(), tmp_path / f"labels{suffix}")
    good = target.read_bytes()
    real_write = sitk.WriteImage

    def write_then_lose_the_tail(image, path, *args):  # what a full disk does to ITK's NIfTI writer
        real_write(image, path, *args)
        with open(path, "r+b") as fh:
            fh.truncate(int(len(fh.read()) * kept))

    monkeypatch.setattr(sitk, "WriteImage", write_then_lose_the_tail)
    bigger = make_image(np.arange(8 * 10 * 12, dtype=np.int16).reshape(8, 10, 12))
    with pytest.raises(CimisError, match="cannot write image file") as info:
        write_image(bigger, target, overwrite=True)
    assert "disk" in info.value.one_line()
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no staging folder left


def _mount_small_tmpfs(folder: Path, size: str) -> bool:
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        return False
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def test_a_full_disk_never_replaces_the_existing_label_map(tmp_path, make_image):
    """The real fault on a real small file system (needs permission to mount a tmpfs, e.g. root)."""
    import subprocess

    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        target = write_image(make_image(), disk / "labels.nii.gz")
        good = target.read_bytes()
        with pytest.raises(OSError):  # fill the rest of the disk
            (disk / "filler").write_bytes(b"\0" * (1 << 20))
        (disk / "filler").write_bytes(b"\0" * ((disk / "filler").stat().st_size - 2048))  # leave 2 KiB
        noise = np.random.default_rng(0).integers(0, 30000, (16, 40, 40)).astype(np.int16)  # 50 kB compressed
        for suffix in (".nii.gz", ".nii"):
            with pytest.raises(CimisError, match="cannot write"):
                write_image(make_image(noise), disk / f"labels{suffix}", overwrite=True)
        assert target.read_bytes() == good
        assert not (disk / "labels.nii").exists()
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "labels.nii.gz"]
    finally:
        subprocess.run(["umount", str(disk)], timeout=30)


def test_nan_and_inf_in_nifti_are_refused_after_reading(tmp_path):
    """ITK's NIfTI reader turns NaN and infinity into 0; the stored values are checked (issue 14, item 5)."""
    values = np.zeros((4, 5, 6), np.float32)
    values[1, 2, 3], values[2, 2, 2] = np.nan, -np.inf
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / f"v{suffix}"))
        with pytest.raises(CimisError, match=r"has 1 NaN and 1 infinite voxels"):
            read_image(tmp_path / f"v{suffix}")
    import nibabel as nib  # another writer: float64, big-endian, its own data offset

    nib.save(nib.Nifti1Image(values.astype(">f8"), np.eye(4)), str(tmp_path / "big_endian.nii.gz"))
    with pytest.raises(CimisError, match=r"has 1 NaN and 1 infinite voxels"):
        read_image(tmp_path / "big_endian.nii.gz")
    values[1, 2, 3] = values[2, 2, 2] = 7.5  # finite floats read as before
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "ok.nii.gz"))
    assert sitk.GetArrayViewFromImage(read_image(tmp_path / "ok.nii.gz"))[1, 2, 3] == 7.5


def test_atomic_text_write_refuses_to_overwrite_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import os

    path = write_text_atomic(tmp_path / "report.md", "first\n")
    with pytest.raises(CimisError, match="already exists") as info:
        write_text_atomic(path, "second\n")
    assert "--overwrite" in info.value.hint
    write_text_atomic(path, "second\n", overwrite=True)
    assert path.read_text() == "second\n"
    assert write_json_atomic(tmp_path / "r.json", {"a": [1, 2]}).read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CimisError, match="No space left on device"):
        write_text_atomic(path, "third, never complete\n", overwrite=True)
    monkeypatch.undo()
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "report.md"]  # no temporary file left
    (tmp_path / "a_file").write_text("")
    for where in (tmp_path / "a_file" / "report.md", tmp_path):  # a file where a folder is needed; a folder
        with pytest.raises(CimisError, match="cannot write"):
            write_text_atomic(where, "x")


@pytest.mark.parametrize("good", ["case 1", "Patient é 肝", "a.b_c-d", "x" * 200])
def test_ids_that_can_name_files(good):
    assert check_id_as_file_name(good, "case id") == good


@pytest.mark.parametrize("bad", ["", " ", "..", ".", ".hidden", "../../x", "/abs/x", "a/b", "a\\b", "C:x", "a\nb",
                                 "a\x1bb", "trailing ", "dot.", "CON", "nul.txt", "x" * 201, 7, None])
def test_ids_that_cannot_name_files_are_refused(bad):
    with pytest.raises(CimisError, match="case id"):
        check_id_as_file_name(bad, "case id")


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


def test_csv_report_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "report_summary.csv"
    with csv_writer_atomic(path) as writer:
        writer.writerow(["method", "dice"])
        writer.writerow(["ft", "=0.5"])
    assert path.read_bytes() == b"method,dice\r\nft,=0.5\r\n"
    with pytest.raises(RuntimeError):
        with csv_writer_atomic(path) as writer:
            writer.writerow(["method", "dice"])
            raise RuntimeError("the run died while the report was being written")
    assert path.read_bytes() == b"method,dice\r\nft,=0.5\r\n"  # the earlier report, not a torn one
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left behind
