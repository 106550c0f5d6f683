"""Tests for the synthetic CT phantom generator (cimis.data.phantom).

Volumes are generated at 5-6 mm so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.classes import btcv_classes, word_classes
from cimis.data.phantom import Phantom, generate_phantom, write_phantom_dataset
from cimis.errors import CimisError

SPACING = (5.0, 5.0, 5.0)


def arrays(ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(ph.image), sitk.GetArrayFromImage(ph.label)


def geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def volume_ml(ph: Phantom, value: int) -> float:
    lab = sitk.GetArrayViewFromImage(ph.label)
    return float((lab == value).sum() * np.prod(ph.label.GetSpacing()) / 1000.0)


def mean_lps(ph: Phantom, value: int) -> np.ndarray:
    """Mean physical (LPS, mm) position of a label, using SimpleITK's own index-to-point mapping."""
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(ph.label) == value)
    idx = np.array([i.mean(), j.mean(), k.mean()])
    return np.array(ph.label.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def btcv_cases() -> list[Phantom]:
    return [generate_phantom(seed, "btcv", SPACING) for seed in range(4)]


@pytest.fixture(scope="module")
def word_case() -> Phantom:
    return generate_phantom(0, "word", SPACING)


# --- determinism and variation --------------------------------------------------------------------

def test_same_seed_is_bit_identical(btcv_cases):
    again = generate_phantom(0, "btcv", SPACING)
    first = btcv_cases[0]
    for x, y in zip(arrays(first), arrays(again)):
        assert np.array_equal(x, y)
    assert geometry(first.image) == geometry(again.image)
    assert geometry(first.label) == geometry(again.label)


def test_different_seeds_give_different_anatomy(btcv_cases):
    (img_a, lab_a), (img_b, lab_b) = arrays(btcv_cases[1]), arrays(btcv_cases[2])
    assert not np.array_equal(lab_a, lab_b)
    assert not np.array_equal(img_a, img_b)
    for name in ("liver", "spleen", "right kidney", "pancreas", "aorta"):
        value = btcv_classes().by_name(name).value
        assert dice(lab_a == value, lab_b == value) < 0.95, name


def test_anatomy_does_not_depend_on_spacing():
    coarse, fine = generate_phantom(5, "btcv", 6.0), generate_phantom(5, "btcv", (4.0, 4.0, 3.0))
    for name in ("liver", "spleen", "left kidney"):
        value = btcv_classes().by_name(name).value
        assert volume_ml(coarse, value) == pytest.approx(volume_ml(fine, value), rel=0.12), name
        assert np.allclose(mean_lps(coarse, value), mean_lps(fine, value), atol=4.0), name


# --- classes, geometry ----------------------------------------------------------------------------

def test_every_btcv_class_present_in_every_case(btcv_cases):
    for ph in btcv_cases:
        assert ph.classes == btcv_classes()
        lab = sitk.GetArrayViewFromImage(ph.label)
        counts = np.bincount(lab.ravel(), minlength=14)
        assert set(np.nonzero(counts)[0]) == set(range(14)), counts
        assert all(counts[v] > 0 for v in ph.classes.values)


def test_word_variant_labels_all_16_classes(word_case):
    assert word_case.classes == word_classes()
    lab = sitk.GetArrayViewFromImage(word_case.label)
    assert set(np.unique(lab)) == set(range(17))
    # The WORD field of view reaches the femoral heads: about 420 mm against 240 mm for BTCV.
    assert word_case.image.GetSize()[2] * SPACING[2] == pytest.approx(420, abs=SPACING[2])


def test_image_and_label_share_geometry(btcv_cases, word_case):
    for ph in [*btcv_cases, word_case]:
        assert geometry(ph.image) == geometry(ph.label)
        assert ph.image.GetPixelID() == sitk.sitkInt16
        assert ph.label.GetPixelID() == sitk.sitkUInt8
        assert ph.image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    ph = btcv_cases[0]
    assert ph.image.GetSize() == (round(384 / 5), round(320 / 5), round(240 / 5))
    assert ph.image.GetSpacing() == SPACING
    # The field of view is centred on x = y = 0 (the body centre, up to the per-case shift).
    lo = np.array(ph.image.GetOrigin())
    hi = np.array(ph.image.TransformIndexToPhysicalPoint([s - 1 for s in ph.image.GetSize()]))
    assert np.allclose((lo + hi)[:2] / 2, 0.0, atol=1e-6)


def test_anisotropic_spacing():
    ph = generate_phantom(1, "btcv", (4.0, 5.0, 6.0))
    assert ph.image.GetSpacing() == (4.0, 5.0, 6.0)
    assert ph.image.GetSize() == (96, 64, 40)
    assert geometry(ph.image) == geometry(ph.label)


# --- anatomy --------------------------------------------------------------------------------------

def test_organ_volumes_are_plausible(btcv_cases):
    c = btcv_classes()
    v = {name: c.by_name(name).value for name in c.names}
    for ph in btcv_cases:
        ml = {name: volume_ml(ph, value) for name, value in v.items()}
        assert 1000 < ml["liver"] < 2100
        assert 100 < ml["spleen"] < 350
        assert 90 < ml["right kidney"] < 250 and 90 < ml["left kidney"] < 250
        assert 40 < ml["pancreas"] < 120
        assert 1 < ml["right adrenal gland"] < 12 and 1 < ml["left adrenal gland"] < 12
        assert ml["liver"] > ml["spleen"] > ml["gallbladder"] > ml["right adrenal gland"]
        assert ml["spleen"] > ml["left adrenal gland"]


def test_organs_are_on_the_correct_side(btcv_cases):
    c = btcv_classes()
    for ph in btcv_cases:
        pos = {name: mean_lps(ph, c.by_name(name).value) for name in c.names}
        # LPS: x grows toward the patient's left, y toward posterior, z toward superior.
        assert pos["right kidney"][0] < 0 < pos["left kidney"][0]
        assert pos["right adrenal gland"][0] < 0 < pos["left adrenal gland"][0]
        assert pos["liver"][0] < 0 < pos["spleen"][0]
        assert pos["left kidney"][2] > pos["right kidney"][2]          # left kidney sits higher
        assert pos["right adrenal gland"][2] > pos["right kidney"][2]  # adrenals sit on the upper poles
        assert pos["right kidney"][1] > pos["gallbladder"][1]          # kidneys are posterior
        assert pos["aorta"][0] > pos["inferior vena cava"][0]          # aorta left of the IVC
        assert pos["esophagus"][2] > pos["pancreas"][2]                # esophagus only in upper slices


def test_intensities_are_plausible(btcv_cases):
    c = btcv_classes()
    for ph in btcv_cases:
        img, lab = arrays(ph)
        assert img.min() >= -1024 and img.max() <= 3071
        assert np.median(img[0, :3, :3]) < -900                       # air in the corner
        med = {name: float(np.median(img[lab == c.by_name(name).value])) for name in c.names}
        assert 60 < med["liver"] < 150
        assert 60 < med["spleen"] < 160
        assert 50 < med["pancreas"] < 140
        assert med["aorta"] > med["liver"]
        assert -30 < med["gallbladder"] < 50
        assert med["right kidney"] > med["liver"] - 20
        assert (img > 300).sum() > 100                                # bone (spine, ribs)
        assert ((img > -150) & (img < -50)).mean() > 0.05                # subcutaneous and visceral fat


# --- dataset writer -------------------------------------------------------------------------------

def test_write_phantom_dataset(tmp_path):
    out = tmp_path / "ds"
    path = write_phantom_dataset(out, 4, "btcv", spacing=6.0, seed=3, val_cases=1, test_cases=1, progress=False)
    assert path == out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["format"] == "cimis-manifest/1"
    assert manifest["classes"] == btcv_classes().to_json()
    ids = [case["id"] for case in manifest["cases"]]
    assert len(ids) == len(set(ids)) == 4
    splits = manifest["splits"]
    assert splits["train"] == ids[:2] and splits["val"] == [ids[2]] and splits["test"] == [ids[3]]
    for case in manifest["cases"]:
        image = sitk.ReadImage(str(out / case["image"]))
        label = sitk.ReadImage(str(out / case["label"]))
        assert geometry(image) == geometry(label)
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, *btcv_classes().values}
    # Case i is generate_phantom(seed * 100003 + i) written losslessly.
    ph = generate_phantom(3 * 100003 + 1, "btcv", 6.0)
    on_disk = sitk.ReadImage(str(out / manifest["cases"][1]["image"]))
    assert np.array_equal(sitk.GetArrayFromImage(on_disk), sitk.GetArrayFromImage(ph.image))
    assert np.allclose(on_disk.GetOrigin(), ph.image.GetOrigin())


def test_rewrite_replaces_previous_phantoms_but_refuses_other_folders(tmp_path):
    out = tmp_path / "ds"
    write_phantom_dataset(out, 4, "btcv", spacing=6.0, progress=False)
    (out / "notes.txt").write_text("mine")
    path = write_phantom_dataset(out, 3, "word", spacing=6.0, val_cases=0, progress=False)
    manifest = json.loads(path.read_text())
    assert manifest["classes"] == word_classes().to_json()
    assert manifest["splits"]["val"] == [] and manifest["splits"]["test"] == ["phantom_002"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    assert (out / "notes.txt").read_text() == "mine"   # only our own files are replaced

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.nii.gz").write_bytes(b"x")
    with pytest.raises(CimisError):
        write_phantom_dataset(other, 3, spacing=6.0, progress=False)
    assert (other / "precious.nii.gz").read_bytes() == b"x"
    assert not (other / "imagesTr").exists()


@pytest.mark.parametrize("kwargs", [
    {"variant": "totalseg"},
    {"num_cases": 2},                       # needs val + test + at least one training case
    {"num_cases": 3, "val_cases": 2},
    {"val_cases": -1},
    {"spacing": (0.0, 3.0, 3.0)},
    {"spacing": (-3.0, 3.0, 3.0)},
    {"spacing": (3.0, 3.0)},
    {"spacing": float("nan")},
    {"seed": -1},
])
def test_bad_arguments_raise_cimis_error(tmp_path, kwargs):
    args = {"out_dir": tmp_path / "ds", "num_cases": 3, "spacing": 6.0, "progress": False, **kwargs}
    with pytest.raises(CimisError) as err:
        write_phantom_dataset(**args)
    assert "\n" not in err.value.one_line()
    assert not (tmp_path / "ds").exists()


def test_generate_phantom_rejects_bad_arguments():
    with pytest.raises(CimisError):
        generate_phantom(0, "ct-org")
    with pytest.raises(CimisError):
        generate_phantom(0, "btcv", (3.0, 0.0, 3.0))
    with pytest.raises(CimisError):
        generate_phantom(-5)
