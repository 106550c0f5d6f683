"""The manifest file: load/save round trip, relative paths, validation, and load_case with label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.classes import ClassSet, btcv_classes, label_dtype
from cimis.data.io import same_geometry, write_image
from cimis.data.manifest import FORMAT, Case, Manifest, apply_label_map, load_case
from cimis.errors import CimisError


def write_manifest(folder: Path, **changes) -> Path:
    data = {
        "format": FORMAT,
        "name": "toy",
        "classes": [{"name": "spleen", "value": 1}, {"name": "liver", "value": 6}],
        "cases": [
            {"id": "a", "image": "img/a.nii.gz", "label": "lab/a.nii.gz"},
            {"id": "b", "image": "img/b.nii.gz", "label": "lab/b.nii.gz", "label_map": {"1": 1, "5": 6}},
            {"id": "c", "image": "/elsewhere/c.nrrd"},
        ],
        "splits": {"train": ["a"], "val": [], "test": ["b"]},
    }
    data.update(changes)
    path = folder / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_load_resolves_paths_and_label_maps(tmp_path):
    m = Manifest.load(write_manifest(tmp_path))
    assert m.name == "toy" and m.classes.names == ["spleen", "liver"] and m.root == tmp_path
    a, b, c = m.cases
    assert a.image == tmp_path / "img" / "a.nii.gz" and a.image.is_absolute() and a.label_map is None
    assert b.label_map == {1: 1, 5: 6}
    assert c.image == Path("/elsewhere/c.nrrd") and c.label is None
    assert [x.id for x in m.cases_in("train")] == ["a"]
    assert m.cases_in("val") == []
    assert m.case("b") is b


def test_save_load_round_trip_writes_relative_paths(tmp_path):
    m = Manifest.load(write_manifest(tmp_path))
    out = m.save(tmp_path / "copy.json")
    saved = json.loads(out.read_text())
    assert saved["cases"][0]["image"] == "img/a.nii.gz"  # under the manifest folder: relative
    assert saved["cases"][2]["image"] == "/elsewhere/c.nrrd"  # elsewhere: absolute
    assert saved["cases"][1]["label_map"] == {"1": 1, "5": 6}
    assert "label" not in saved["cases"][2]
    back = Manifest.load(out)
    assert back.cases == m.cases and back.splits == m.splits and back.classes == m.classes

    # Saved from another folder, paths stay correct.
    moved = m.save(tmp_path / "sub" / "deeper" / "m.json")
    assert json.loads(moved.read_text())["cases"][0]["image"] == str(tmp_path / "img" / "a.nii.gz")
    assert Manifest.load(moved).cases == m.cases

    with pytest.raises(CimisError, match="already exists"):
        m.save(out)
    m.save(out, overwrite=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "something/2"}, "expected 'cimis-manifest/1'"),
        ({"splits": {"train": ["a", "zzz"]}}, "unknown cases"),
        ({"splits": {"train": ["a"], "test": ["a"]}}, "both in 'test'"),
        ({"cases": [{"id": "a", "image": "x"}, {"id": "a", "image": "y"}], "splits": {}}, "duplicate case ids"),
        ({"cases": [{"id": "a"}], "splits": {}}, "needs an 'image'"),
        ({"cases": [{"id": "a", "image": "x", "label_map": {"one": 1}}], "splits": {}}, "must be integers"),
        ({"cases": [{"id": "a", "image": "x", "label_map": {"1": 7}}], "splits": {}}, "not class values"),
        ({"classes": [{"name": "liver", "value": 0}]}, "positive"),
        ({"classes": None}, "'classes' must be a list"),
        # Ids name prediction files: none may reach outside the output folder (issue 14, item 7).
        ({"cases": [{"id": "../../x", "image": "x"}], "splits": {}}, "case id '../../x' cannot name a file"),
        ({"cases": [{"id": "/tmp/x", "image": "x"}], "splits": {}}, "case id '/tmp/x' cannot name a file"),
        ({"cases": [{"id": "a\rb", "image": "x"}], "splits": {}}, "control character"),
        # Above 65535 a label value would wrap around in a uint16 label map (issue 14, item 6).
        ({"classes": [{"name": "liver", "value": 65537}]}, "at most 65535"),
    ],
)
def test_invalid_manifests_raise_cimis_error(tmp_path, changes, message):
    path = write_manifest(tmp_path, **changes)
    with pytest.raises(CimisError, match=message) as info:
        Manifest.load(path)
    assert str(path) in info.value.message


def test_ids_with_spaces_and_non_ascii_letters_are_kept(tmp_path):
    path = write_manifest(tmp_path, cases=[{"id": "Patient 1 é", "image": "x"}], splits={"test": ["Patient 1 é"]})
    assert [c.id for c in Manifest.load(path).cases_in("test")] == ["Patient 1 é"]


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"format": "cimis-manifest/1",\n "cases": [,]}')
    with pytest.raises(CimisError, match="not valid JSON: .* line 2 column"):
        Manifest.load(path)
    with pytest.raises(CimisError, match="does not exist"):
        Manifest.load(tmp_path / "none.json")


def test_unknown_split_and_case(tmp_path):
    m = Manifest.load(write_manifest(tmp_path))
    with pytest.raises(CimisError, match="no split 'tune'") as info:
        m.cases_in("tune")
    assert "train, val, test" in info.value.hint
    with pytest.raises(CimisError, match="no case 'zzz'"):
        m.case("zzz")


def _write_case(tmp_path, make_image, label: np.ndarray, **label_geometry) -> tuple:
    image = make_image(np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32))
    write_image(image, tmp_path / "ct.nii.gz")
    write_image(make_image(label, **label_geometry), tmp_path / "seg.nii.gz")
    return image, Case("x", tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz")


def test_load_case_without_label_map(tmp_path, make_image):
    label = np.zeros((8, 10, 12), np.int32)
    label[2:4, 3:5, 4:6] = 6
    label[5, 5, 5] = 1
    image, case = _write_case(tmp_path, make_image, label)
    img, lab = load_case(case, btcv_classes())
    assert same_geometry(img, image) and lab.GetPixelID() == sitk.sitkUInt8
    assert lab.GetOrigin() == img.GetOrigin() and lab.GetDirection() == img.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), label)

    img, lab = load_case(Case("x", case.image), btcv_classes())
    assert lab is None


def test_load_case_applies_label_map(tmp_path, make_image):
    label = np.zeros((8, 10, 12), np.uint8)
    label[0] = 5  # -> liver (6)
    label[1] = 1  # -> spleen (1)
    label[2] = 77  # not in the map -> background
    _, case = _write_case(tmp_path, make_image, label)
    case.label_map = {5: 6, 1: 1}
    _, lab = load_case(case, btcv_classes())
    out = sitk.GetArrayFromImage(lab)
    assert (out[0] == 6).all() and (out[1] == 1).all() and (out[2:] == 0).all()

    with pytest.raises(CimisError, match=r"values \[5, 77\] outside the class list"):
        load_case(Case("x", case.image, case.label), ClassSet.from_names(["spleen"]))  # no map: raw values

    case.label_map = {200: 1}
    with pytest.raises(CimisError, match="no foreground voxel"):
        load_case(case, btcv_classes())


def test_load_case_label_dtype_follows_class_values(tmp_path, make_image):
    label = np.zeros((8, 10, 12), np.uint16)
    label[1] = 300
    _, case = _write_case(tmp_path, make_image, label)
    _, lab = load_case(case, ClassSet.from_names(["big"], first_value=300))
    assert lab.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayViewFromImage(lab).max() == 300


def test_label_values_above_uint16_are_never_wrapped(tmp_path, make_image):
    """Class 65537 stored as uint16 would be trained as class 1: refused wherever the dtype is chosen."""
    with pytest.raises(CimisError, match="at most 65535"):
        ClassSet.from_names(["big"], first_value=65537)
    with pytest.raises(CimisError, match="does not fit"):
        label_dtype([1, 70000])
    assert label_dtype([255]) == np.uint8 and label_dtype([256, 65535]) == np.uint16
    label = np.zeros((8, 10, 12), np.int32)
    label[1] = 65537  # on disk; the class set knows only 1
    _, case = _write_case(tmp_path, make_image, label)
    with pytest.raises(CimisError, match=r"values \[65537\] outside the class list"):
        load_case(case, ClassSet.from_names(["spleen"]))
    case.label_map = {65537: 2}  # a label_map sends large on-disk values to small class values
    _, lab = load_case(case, ClassSet.from_names(["spleen", "liver"]))
    assert sitk.GetArrayViewFromImage(lab)[1].min() == 2


def test_load_case_refuses_bad_inputs(tmp_path, make_image):
    label = np.zeros((8, 10, 12), np.uint8)
    label[1] = 1
    _, case = _write_case(tmp_path, make_image, label, origin=(0, 0, 0))
    with pytest.raises(CimisError, match="seg.nii.gz is not on the grid"):
        load_case(case, btcv_classes())

    nan = np.zeros((8, 10, 12), np.float32)
    nan[0, 0, 0] = np.nan
    for suffix in (".nrrd", ".nii.gz"):  # ITK's NIfTI reader turns NaN into 0: the file itself is checked
        sitk.WriteImage(make_image(nan), str(tmp_path / f"ct{suffix}"))
        case.image = tmp_path / f"ct{suffix}"
        with pytest.raises(CimisError, match=f"ct{suffix} has 1 NaN"):
            load_case(case, btcv_classes())

    with pytest.raises(CimisError, match="does not exist"):
        load_case(Case("x", tmp_path / "missing.nii.gz"), btcv_classes())


def test_apply_label_map_handles_float_and_huge_values():
    assert apply_label_map(np.array([0.0, 42.0, 7.0]), {42: 5}).tolist() == [0, 5, 0]
    assert apply_label_map(np.array([0, 5_000_000, 3]), {5_000_000: 2, 3: 1}).tolist() == [0, 2, 1]
