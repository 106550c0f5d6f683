"""The hard phantom setting: step volumes from "another scanner" (cimis.data.phantom.Scanner), seeded, and
different from step 0's scanner in each documented way; the pseudo-label error counts by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cimis.bench.pseudo_label_errors import _class_counts, _counts, _figures
from cimis.data.phantom import OTHER_SCANNER, PHASE_HU, REFERENCE_SCANNER, Scanner, generate_phantom, write_phantom_dataset
from cimis.errors import CimisError
from cimis.incremental.prototypes import IGNORE

SPACING = (6.0, 6.0, 6.0)
LIVER, AORTA, PORTAL, IVC = 6, 8, 10, 9


@pytest.fixture(scope="module")
def pair():
    return generate_phantom(5, "btcv", SPACING), generate_phantom(5, "btcv", SPACING, OTHER_SCANNER)


def _arrays(ph):
    return sitk.GetArrayFromImage(ph.image).astype(np.float64), sitk.GetArrayFromImage(ph.label)


def _core_mean(ph, value):
    """Mean stored value inside an organ, away from its edges (one voxel eroded)."""
    image, label = _arrays(ph)
    core = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(ph.label == value, sitk.sitkUInt8), [1, 1, 1]))
    return image[core > 0].mean() if core.any() else image[label == value].mean()


def test_the_other_scanner_is_seeded():
    a, b = generate_phantom(5, "btcv", SPACING, OTHER_SCANNER), generate_phantom(5, "btcv", SPACING, OTHER_SCANNER)
    for x, y in ((a.image, b.image), (a.label, b.label)):
        assert np.array_equal(sitk.GetArrayFromImage(x), sitk.GetArrayFromImage(y))
    other_seed = generate_phantom(6, "btcv", SPACING, OTHER_SCANNER)
    assert not np.array_equal(sitk.GetArrayFromImage(a.label), sitk.GetArrayFromImage(other_seed.label))


def test_the_reference_scanner_is_the_default():
    a, b = generate_phantom(5, "btcv", SPACING), generate_phantom(5, "btcv", SPACING, REFERENCE_SCANNER)
    assert np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))


def test_spacing_and_field_of_view_differ(pair):
    reference, other = pair
    assert other.image.GetSpacing() == pytest.approx(tuple(s * f for s, f in zip(SPACING, OTHER_SCANNER.spacing_factor)))
    extent = [n * s for n, s in zip(reference.image.GetSize(), reference.image.GetSpacing())]
    other_extent = [n * s for n, s in zip(other.image.GetSize(), other.image.GetSpacing())]
    for e, o, f in zip(extent, other_extent, OTHER_SCANNER.fov_factor):
        assert o == pytest.approx(e * f, abs=max(other.image.GetSpacing()))
    top = reference.image.GetOrigin()[2] + (reference.image.GetSize()[2] - 1) * SPACING[2]
    other_top = other.image.GetOrigin()[2] + (other.image.GetSize()[2] - 1) * other.image.GetSpacing()[2]
    assert other_top == pytest.approx(top + OTHER_SCANNER.fov_shift_z, abs=OTHER_SCANNER.spacing_factor[2] * SPACING[2])


def test_calibration_is_scale_and_offset():
    reference = generate_phantom(5, "btcv", SPACING)
    calibrated = generate_phantom(5, "btcv", SPACING, Scanner(name="c", intensity_scale=0.9, intensity_offset=30.0))
    a, b = _arrays(reference)[0], _arrays(calibrated)[0]
    inside = (a > -1000) & (a < 3000)  # away from the int16 clipping of air and bone
    assert np.abs(b[inside] - (0.9 * a[inside] + 30.0)).max() <= 1.0  # rounding only


def test_the_arterial_phase_changes_vessel_and_organ_brightness():
    reference = generate_phantom(5, "btcv", SPACING)
    arterial = generate_phantom(5, "btcv", SPACING, Scanner(name="a", phase="arterial"))
    # Same geometry, only the tissues' HU differ: the liver's core shifts by the table's value; thin
    # vessels are mixed with their neighbours by the blur, but move far in the table's direction.
    assert _core_mean(arterial, LIVER) - _core_mean(reference, LIVER) == pytest.approx(PHASE_HU["arterial"]["liver"], abs=5)
    assert _core_mean(arterial, AORTA) - _core_mean(reference, AORTA) > 0.5 * PHASE_HU["arterial"]["aorta"]
    assert _core_mean(arterial, PORTAL) - _core_mean(reference, PORTAL) < 0.5 * PHASE_HU["arterial"]["portal"]
    assert _core_mean(arterial, IVC) - _core_mean(reference, IVC) < 0.5 * PHASE_HU["arterial"]["ivc"]


def test_noise_and_blur_factors():
    reference = generate_phantom(5, "btcv", SPACING)
    noisy = generate_phantom(5, "btcv", SPACING, Scanner(name="n", noise_factor=1.6))
    blurred = generate_phantom(5, "btcv", SPACING, Scanner(name="b", blur_factor=2.0))

    def air_noise(ph):  # outside the body the image is air plus noise
        return _arrays(ph)[0][:, :3, :3].std()

    assert air_noise(noisy) / air_noise(reference) == pytest.approx(1.6, rel=0.15)
    # Blur: the edges are softer, so the image's gradient is weaker.
    def gradient(ph):
        return np.abs(np.diff(_arrays(ph)[0], axis=2)).mean()

    assert gradient(blurred) < 0.9 * gradient(reference)


def test_the_other_scanner_combines_them(pair):
    reference, other = pair
    assert _core_mean(other, AORTA) > _core_mean(reference, AORTA) + 80
    assert _core_mean(other, PORTAL) < _core_mean(reference, PORTAL) - 50
    assert _core_mean(other, LIVER) < _core_mean(reference, LIVER) - 15


def test_organ_shapes_vary_beyond_the_usual(pair):
    reference, other = pair
    _, ref_label = _arrays(reference)
    _, other_label = _arrays(other)
    ref_voxel, other_voxel = np.prod(reference.image.GetSpacing()), np.prod(other.image.GetSpacing())
    # Organs well inside both fields of view: spleen, kidneys, aorta section volumes change by the
    # scanner's size factors (each axis within exp(+-2 * 0.12)).
    ratios = [(other_label == v).sum() * other_voxel / ((ref_label == v).sum() * ref_voxel) for v in (1, 2, 3)]
    assert any(abs(r - 1) > 0.05 for r in ratios)
    assert all(0.4 < r < 2.5 for r in ratios)


def test_the_hard_dataset_splits_scanners(tmp_path):
    path = write_phantom_dataset(tmp_path / "hard", 6, spacing=(10.0, 10.0, 10.0), val_cases=1, test_cases=2,
                                 progress=False, step_scanner=OTHER_SCANNER)
    manifest = json.loads(path.read_text())
    splits = manifest["splits"]
    assert manifest["name"] == "phantom-btcv-hard"
    assert splits["train"] == ["phantom_000", "phantom_001"] and splits["train_steps"] == ["phantom_002"]
    assert splits["val"] == ["phantom_003"] and splits["test"] == ["phantom_004", "phantom_005"]
    assert splits["scanner_other"] == ["phantom_002", "phantom_004"]
    spacing = sitk.ReadImage(str(tmp_path / "hard" / "imagesTr" / "phantom_002.nii.gz")).GetSpacing()
    assert spacing == pytest.approx((8.5, 8.5, 15.0))
    with pytest.raises(CimisError, match="at least 2 training cases"):
        write_phantom_dataset(tmp_path / "x", 3, val_cases=1, test_cases=1, progress=False, step_scanner=OTHER_SCANNER)


def test_a_bad_scanner_is_refused():
    with pytest.raises(CimisError, match="contrast phase"):
        Scanner(phase="delayed")
    with pytest.raises(CimisError, match="positive"):
        Scanner(noise_factor=0.0)


def test_pseudo_label_error_counts_by_hand():
    # Truth (old model's channels; -1 = a class it does not know) and pseudo-labels, six voxels:
    truth = torch.tensor([0, 1, 1, 2, 0, -1])
    targets = torch.tensor([0, 1, IGNORE, 1, 2, 1])
    figures = _figures(_counts(targets, truth))
    # Counted: 5 voxels (not the unknown one); wrong: organ 2 called 1, background called 2 -> 2 of 5;
    # ignored 1 of 5; old-organ voxels 3, mislabelled 1 (the ignored one is not wrong); labelled as an
    # organ 3 (1, 1, 2), of which 2 wrong.
    assert figures == {"voxels": 5, "wrong": pytest.approx(0.4), "ignored": pytest.approx(0.2),
                       "old_organ_wrong": pytest.approx(1 / 3), "organ_label_wrong": pytest.approx(2 / 3)}
    per_class = _class_counts(targets, truth, 3)
    # Organ 1: two true voxels, none mislabelled, one ignored; called 1 twice, once wrongly (truth 2).
    # Organ 2: one true voxel, mislabelled; called 2 once, wrongly (truth 0).
    assert per_class[1].tolist() == [2, 0, 1, 2, 1] and per_class[2].tolist() == [1, 1, 0, 1, 1]
