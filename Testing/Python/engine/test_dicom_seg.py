"""DICOM SEG output (`cimis segment --dicom-seg`): read back with pydicom, frame by frame against the label map."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cimis.cli import main
from cimis.data.classes import ClassInfo, ClassSet, btcv_classes
from cimis.data.dicom_seg import SegAlgorithm, write_dicom_seg
from cimis.data.io import read_image, write_dicom_series
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.model.modelfile import ModelCard, save_model
from cimis.model.network import NetworkConfig, SegmentationNet

CLASSES = ClassSet([ClassInfo("liver", 1, (220, 130, 100)), ClassInfo("kidney_R", 3, (185, 102, 83)),
                    ClassInfo("tumour", 7, (0, 151, 206)), ClassInfo("spleen", 9, (157, 108, 162))])
TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])


@pytest.fixture
def series(tmp_path, make_image):
    """A small oblique CT written as a DICOM series, and the grid SimpleITK reads it on."""
    folder = write_dicom_series(make_image(), tmp_path / "ct")
    return folder, read_image(folder)


def known_labels(grid: sitk.Image) -> sitk.Image:
    """Liver, right kidney and tumour in distinct, slice-dependent places; no spleen."""
    values = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.uint8)  # (z, y, x) = (8, 10, 12)
    values[1:4, 2:5, 3:9] = 1
    values[2:7, 6:9, 1:3] = 3
    for k in range(values.shape[0]):
        values[k, k % 10, 10:] = 7  # moves with the slice: a wrong frame order shows
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(grid)
    return label


def frames_by_instance_and_segment(seg) -> dict[tuple[str, int], np.ndarray]:
    """(referenced source SOP instance UID, segment number) -> that frame's binary mask."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    found = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert (uid, number) not in found
        found[uid, number] = frame
    return found


def assert_seg_matches(seg_path, source_folder, label: sitk.Image, classes: ClassSet) -> None:
    seg = pydicom.dcmread(seg_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(source_folder.iterdir())]
    values = sitk.GetArrayFromImage(label)
    present = [c for c in classes if (values == c.value).any()]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [c.name for c in present]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    frames = frames_by_instance_and_segment(seg)
    for ds in sources:  # each source slice, placed on the label map's grid by its own position
        k = label.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        for number, info in enumerate(present, start=1):
            expected = values[k] == info.value
            got = frames.get((ds.SOPInstanceUID, number), np.zeros_like(expected))
            assert np.array_equal(got.astype(bool), expected), (ds.InstanceNumber, info.name)


def test_writer_codes_segments_and_matches_every_source_frame(series, tmp_path):
    folder, grid = series
    label = known_labels(grid)
    path = write_dicom_seg(folder, label, CLASSES, tmp_path / "out.seg.dcm", SegAlgorithm("CIMISLearner m", "0.1"))
    assert_seg_matches(path, folder, label, CLASSES)
    segments = {s.SegmentLabel: s for s in pydicom.dcmread(path).SegmentSequence}
    liver, kidney, tumour = segments["liver"], segments["kidney_R"], segments["tumour"]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.CodeValue == "64033007"
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # generic Tissue
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    assert liver.SegmentAlgorithmName == "CIMISLearner m" and liver.SegmentAlgorithmType == "AUTOMATIC"


def test_writer_refuses_a_label_map_off_the_series_grid(series, tmp_path):
    folder, grid = series
    shifted = known_labels(grid)
    shifted.SetOrigin([o + 0.5 for o in grid.GetOrigin()])
    with pytest.raises(CimisError, match="not on the grid"):
        write_dicom_seg(folder, shifted, CLASSES, tmp_path / "x.seg.dcm", SegAlgorithm("m", "1"))
    assert not (tmp_path / "x.seg.dcm").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    net = SegmentationNet(TINY_NET, btcv_classes().num_channels)
    card = ModelCard(btcv_classes(), TINY_NET, PreprocessConfig(spacing=[8.0, 8.0, 8.0], patch_size=[32, 32, 16]))
    return save_model(tmp_path_factory.mktemp("model") / "model", net, card)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_segment_dicom_series_writes_seg_beside_the_label_map(capsys, tiny_model, series, tmp_path):
    folder, _ = series
    code, out, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", folder,
                             "--output", tmp_path / "out" / "case.nii.gz", "--dicom-seg", "--device", "cpu")
    assert code == 0, err
    seg_path = tmp_path / "out" / "case.seg.dcm"
    assert f"-> {seg_path}" in out
    label = read_image(tmp_path / "out" / "case.nii.gz")
    assert_seg_matches(seg_path, folder, label, btcv_classes())
    seg = pydicom.dcmread(seg_path)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "CIMISLearner model"

    # An existing SEG is kept unless --overwrite; nothing else is written either.
    before = seg_path.read_bytes()
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", folder,
                           "--output", tmp_path / "other.nii.gz", "--dicom-seg", seg_path, "--device", "cpu")
    assert code == 2 and "already exists" in one_error_line(err)
    assert seg_path.read_bytes() == before and not (tmp_path / "other.nii.gz").exists()


def test_dicom_seg_needs_a_dicom_series_input(capsys, tiny_model, series, tmp_path):
    folder, grid = series
    sitk.WriteImage(grid, str(tmp_path / "ct.nii.gz"))
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", tmp_path / "ct.nii.gz",
                           "--output", tmp_path / "out.nii.gz", "--dicom-seg", "--device", "cpu")
    assert code == 2 and "dicom series folder" in one_error_line(err).lower()
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "out.seg.dcm").exists()


def test_dicom_seg_without_highdicom_says_how_to_install(capsys, monkeypatch, tiny_model, series, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)  # what a missing package imports as
    folder, _ = series
    code, _, err = run_cli(capsys, "segment", "--model", tiny_model, "--input", folder,
                           "--output", tmp_path / "out.nii.gz", "--dicom-seg", "--device", "cpu")
    assert code == 2 and 'pip install "cimis[dicom]"' in one_error_line(err)
    assert not (tmp_path / "out.nii.gz").exists()


def test_writer_refuses_an_empty_segmentation_and_an_existing_file(series, tmp_path):
    folder, grid = series
    empty = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(grid)
    with pytest.raises(CimisError, match="holds no class"):
        write_dicom_seg(folder, empty, CLASSES, tmp_path / "e.seg.dcm", SegAlgorithm("m", "1"))
    assert not (tmp_path / "e.seg.dcm").exists()
    (tmp_path / "kept.seg.dcm").write_bytes(b"old")
    with pytest.raises(CimisError, match="already exists"):
        write_dicom_seg(folder, known_labels(grid), CLASSES, tmp_path / "kept.seg.dcm", SegAlgorithm("m", "1"))
    assert (tmp_path / "kept.seg.dcm").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
