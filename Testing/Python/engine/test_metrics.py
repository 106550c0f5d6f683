"""Tests for cimis.metrics: hand-computed Dice/HD95/volumes, NaN conventions, and the report formats."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch

from cimis.data.classes import ClassSet
from cimis.errors import CimisError
from cimis.metrics import (
    CaseMetrics,
    EvaluationReport,
    class_volumes_ml,
    evaluate_case,
    format_class_table,
    hd95_mm,
)

ISO = (1.0, 1.0, 1.0)


@pytest.fixture
def classes() -> ClassSet:
    return ClassSet.from_names(["liver", "spleen", "kidney"])  # values 1, 2, 3


def _empty(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- Dice


def test_dice_of_two_overlapping_cubes_is_exact(classes):
    pred, ref = _empty(), _empty()
    pred[0:4, 0:4, 0:4] = 1  # |A| = 4*4*4 = 64
    ref[2:5, 1:4, 0:4] = 1  # |B| = 3*3*4 = 36
    # A ∩ B = [2:4, 1:4, 0:4] -> 2*3*4 = 24, so Dice = 2*24 / (64 + 36) = 48/100 = 0.48
    m = evaluate_case(pred, ref, ISO, classes)
    assert m.dice["liver"] == pytest.approx(0.48, rel=1e-6)


def test_identical_maps_give_one_for_present_classes_and_nan_for_absent(classes):
    ref = _empty()
    ref[1:5, 1:5, 1:5] = 1
    ref[6:10, 6:10, 6:10] = 2
    m = evaluate_case(ref, ref.copy(), ISO, classes)
    assert m.dice["liver"] == 1.0 and m.dice["spleen"] == 1.0
    assert math.isnan(m.dice["kidney"])  # absent from both


def test_absent_class_is_left_out_of_the_means(classes):
    pred, ref = _empty(), _empty()
    pred[0:4, 0:4, 0:4] = 1
    ref[2:5, 1:4, 0:4] = 1  # liver Dice 0.48 (see above)
    ref[6:10, 6:10, 6:10] = 2
    pred[6:10, 6:10, 6:10] = 2  # spleen Dice 1.0; kidney absent -> NaN
    report = EvaluationReport(classes, [evaluate_case(pred, ref, ISO, classes)])
    assert math.isnan(report.mean_dice()["kidney"])
    # (0.48 + 1.0) / 2, not / 3
    assert report.overall_mean_dice() == pytest.approx(0.74, rel=1e-6)
    assert report.overall_mean_dice(["liver"]) == pytest.approx(0.48, rel=1e-6)
    assert math.isnan(report.overall_mean_dice(["kidney"]))


def test_predicted_only_and_missed_classes_score_zero(classes):
    pred, ref = _empty(), _empty()
    pred[1:4, 1:4, 1:4] = 3  # kidney predicted, not in the reference
    ref[6:9, 6:9, 6:9] = 2  # spleen in the reference, not predicted
    m = evaluate_case(pred, ref, ISO, classes, hd95=True)
    assert m.dice["kidney"] == 0.0 and m.dice["spleen"] == 0.0
    assert math.isnan(m.hd95["kidney"]) and math.isnan(m.hd95["spleen"])  # one side empty


def test_values_outside_the_class_set_count_as_background(classes):
    pred, ref = _empty(), _empty()
    pred[1:5, 1:5, 1:5] = 1
    ref[1:5, 1:5, 1:5] = 1
    ref[7:10, 7:10, 7:10] = 9  # an organ the class set does not know
    m = evaluate_case(pred, ref, ISO, classes)
    assert m.dice["liver"] == 1.0
    assert set(m.dice) == {"liver", "spleen", "kidney"}


def test_empty_maps_give_nan_everywhere(classes):
    m = evaluate_case(_empty(), _empty(), ISO, classes, hd95=True)
    assert all(math.isnan(v) for v in m.dice.values())
    assert all(math.isnan(v) for v in m.hd95.values())
    assert all(v == 0.0 for v in m.volume_ml_ref.values())


# ---------------------------------------------------------------------------------------------- HD95


@pytest.mark.parametrize(
    "axis, shift, spacing, expected_mm",
    [
        (0, 2, (2.5, 1.0, 1.0), 5.0),  # 2 voxels x 2.5 mm
        (1, 2, (2.5, 0.8, 0.8), 1.6),  # 2 voxels x 0.8 mm; the coarse axis 0 must not matter
        (2, 3, (1.0, 1.0, 0.7), 2.1),  # 3 voxels x 0.7 mm
    ],
)
def test_hd95_of_a_shifted_cube_is_the_shift_in_mm(classes, axis, shift, spacing, expected_mm):
    # Every surface voxel is within `shift` voxels (along `axis`) of the other surface, and the whole cap
    # face (1/6 of the surface, > 5%) is exactly that far, so the 95th percentile equals the shift.
    pred, ref = _empty((20, 20, 20)), _empty((20, 20, 20))
    ref[4:12, 4:12, 4:12] = 1
    pred[:] = np.roll(ref, shift, axis=axis)
    m = evaluate_case(pred, ref, spacing, classes, hd95=True)
    assert m.hd95["liver"] == pytest.approx(expected_mm, rel=1e-5)
    assert math.isnan(m.hd95["spleen"])


def test_hd95_of_identical_masks_is_zero():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:7, 3:8, 1:6] = True
    assert hd95_mm(mask, mask, (3.0, 0.7, 0.7)) == 0.0


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """The definition spelled out: 6-connected surface voxels, all-pairs distances, 95th percentiles."""

    def surface(m):
        p = np.pad(m, 1)
        interior = m.copy()
        for axis in range(3):
            for step in (-1, 1):
                interior &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~interior) * np.asarray(spacing)

    d = torch.cdist(torch.from_numpy(surface(a)), torch.from_numpy(surface(b)))
    return max(np.percentile(d.min(1).values.numpy(), 95), np.percentile(d.min(0).values.numpy(), 95))


def test_hd95_matches_the_brute_force_definition_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(int(n) for n in rng.integers(4, 24, 3))
        a = rng.random(shape) < rng.uniform(0.01, 0.3)
        b = rng.random(shape) < rng.uniform(0.01, 0.3)
        a[0, 0, 0] = b[-1, -1, -1] = True  # never empty
        spacing = tuple(float(s) for s in rng.uniform(0.3, 5.0, 3))
        assert hd95_mm(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), rel=1e-5)


# ---------------------------------------------------------------------------------------------- volumes


def test_volumes_in_ml(classes):
    label = _empty((20, 20, 20))
    label[0:10, 0:10, 0:10] = 1  # 1000 voxels
    label[12:14, 12:14, 12:14] = 2  # 8 voxels
    vols = class_volumes_ml(label, ISO, classes)
    assert vols == {"liver": pytest.approx(1.0), "spleen": pytest.approx(0.008), "kidney": 0.0}
    # 1000 voxels of 2x2x2 mm = 8000 mm^3 = 8 mL
    assert class_volumes_ml(label, (2, 2, 2), classes)["liver"] == pytest.approx(8.0)
    m = evaluate_case(np.zeros_like(label), label, (2, 2, 2), classes)
    assert m.volume_ml_ref["liver"] == pytest.approx(8.0) and m.volume_ml_pred["liver"] == 0.0


# ---------------------------------------------------------------------------------------------- errors


def test_shape_mismatch_raises(classes):
    with pytest.raises(CimisError, match="shape"):
        evaluate_case(_empty((10, 10, 10)), _empty((10, 10, 11)), ISO, classes)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0), "abc"])
def test_bad_spacing_raises(classes, spacing):
    with pytest.raises(CimisError, match="spacing"):
        evaluate_case(_empty(), _empty(), spacing, classes)


def test_non_3d_maps_raise(classes):
    with pytest.raises(CimisError, match="3-D"):
        evaluate_case(np.zeros((10, 10)), np.zeros((10, 10)), ISO, classes)


# ---------------------------------------------------------------------------------------------- report


def _two_case_report(classes: ClassSet) -> EvaluationReport:
    pred, ref = _empty(), _empty()
    pred[0:4, 0:4, 0:4] = 1
    ref[2:5, 1:4, 0:4] = 1  # liver Dice 0.48
    ref[6:10, 6:10, 6:10] = 2
    pred[6:10, 6:10, 6:10] = 2  # spleen Dice 1.0; kidney absent
    first = evaluate_case(pred, ref, ISO, classes, case_id="a", hd95=True)
    second = evaluate_case(ref, ref, ISO, classes, case_id="b", hd95=True)  # all present classes 1.0
    return EvaluationReport(classes, [first, second])


def test_report_means_over_cases(classes):
    report = _two_case_report(classes)
    assert report.mean_dice()["liver"] == pytest.approx((0.48 + 1.0) / 2, rel=1e-6)
    assert report.mean_dice()["spleen"] == 1.0
    assert math.isnan(report.mean_dice()["kidney"])
    assert report.mean_hd95()["spleen"] == 0.0
    assert EvaluationReport(classes, [evaluate_case(_empty(), _empty(), ISO, classes)]).mean_hd95() is None


def test_markdown_has_a_row_per_class_and_a_mean_row(classes):
    md = _two_case_report(classes).to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    labels = [r.strip("|").split("|")[0].strip() for r in rows]
    assert labels[0] == "class" and labels[2:] == ["liver", "spleen", "kidney", "mean"]
    assert "HD95 (mm)" in rows[0]
    liver = rows[2]
    assert "0.740 ± 0.260" in liver  # mean 0.74, population std 0.26 over the two cases
    assert "n/a" in rows[4]  # kidney


def test_markdown_single_case_has_plain_values_and_no_hd95_column(classes):
    ref = _empty()
    ref[1:5, 1:5, 1:5] = 1
    md = EvaluationReport(classes, [evaluate_case(ref, ref, ISO, classes)]).to_markdown()
    assert "HD95" not in md and "±" not in md
    assert re.search(r"^\| liver +\| +1\.000 \|$", md, flags=re.MULTILINE)


def test_json_round_trip_keeps_means_and_writes_null_for_nan(classes, tmp_path):
    report = _two_case_report(classes)
    path = report.to_json(tmp_path / "r.json")
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["mean"]["dice"]["kidney"] is None
    assert data["cases"][0]["dice"]["kidney"] is None
    back = EvaluationReport.from_json(path)
    assert back.classes == classes
    for name, value in report.mean_dice().items():
        assert back.mean_dice()[name] == pytest.approx(value, nan_ok=True)
    for name, value in report.mean_hd95().items():
        assert back.mean_hd95()[name] == pytest.approx(value, nan_ok=True)
    assert back.overall_mean_dice() == pytest.approx(report.overall_mean_dice())


def test_csv_has_per_case_rows_and_mean_rows(classes, tmp_path):
    report = _two_case_report(classes)
    with report.to_csv(tmp_path / "r.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 + 3
    by_key = {(r["case_id"], r["class"]): r for r in rows}
    assert float(by_key[("a", "liver")]["dice"]) == pytest.approx(0.48, rel=1e-6)
    assert float(by_key[("mean", "liver")]["dice"]) == pytest.approx(report.mean_dice()["liver"])
    assert by_key[("a", "kidney")]["dice"] == ""  # NaN -> empty field
    assert float(by_key[("b", "spleen")]["volume_ml_ref"]) == pytest.approx(0.064)


def test_write_creates_the_three_files(classes, tmp_path):
    paths = _two_case_report(classes).write(tmp_path / "out", stem="eval")
    assert {p.name for p in paths.values()} == {"eval.md", "eval.csv", "eval.json"}
    assert all(p.is_file() for p in paths.values())


def test_write_refuses_an_existing_report_and_writes_nothing(classes, tmp_path):
    report = _two_case_report(classes)
    paths = report.write(tmp_path / "out")
    before = {p: p.read_bytes() for p in paths.values()}
    paths["csv"].unlink()  # even a partly present report is not overwritten
    with pytest.raises(CimisError, match="evaluation.md already exists") as info:
        report.write(tmp_path / "out")
    assert "--overwrite" in info.value.hint
    assert not paths["csv"].exists() and paths["md"].read_bytes() == before[paths["md"]]
    report.write(tmp_path / "out", overwrite=True)
    assert all(p.read_bytes() == before[p] for p in paths.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evaluation.csv", "evaluation.json", "evaluation.md"]
    with pytest.raises(CimisError, match="is a file"):
        report.write(paths["md"])


def test_class_names_cannot_drive_the_terminal_or_a_spreadsheet(tmp_path):
    """A class name with control characters is shown escaped; one starting with = + - @ is text in CSV."""
    classes = ClassSet.from_names(["=HYPERLINK(\"http://x\")", "liver\x1b[2J", "@sum", "a|b"])
    pred = _empty()
    pred[0:2, 0:2, 0:2] = 1
    report = EvaluationReport(classes, [evaluate_case(pred, pred, ISO, classes, case_id="-1+1")])
    table = report.to_markdown()
    assert "\x1b" not in table and "liver\\x1b[2J" in table and "a\\|b" in table
    with report.to_csv(tmp_path / "r.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["class"] for r in rows} == {"'=HYPERLINK(\"http://x\")", "liver\x1b[2J", "'@sum", "a|b"}
    assert {r["case_id"] for r in rows} == {"'-1+1", "mean"}
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in (r["class"], r["case_id"]))


def test_from_json_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(CimisError):
        EvaluationReport.from_json(bad)
    with pytest.raises(CimisError):
        EvaluationReport.from_json(tmp_path / "missing.json")


def test_unknown_class_in_subset_mean_raises(classes):
    with pytest.raises(CimisError, match="unknown class"):
        _two_case_report(classes).overall_mean_dice(["pancreas"])


def test_case_metrics_dict_round_trip():
    m = CaseMetrics("c1", {"a": 0.5, "b": math.nan}, None, {"a": 1.0, "b": 0.0}, {"a": 1.5, "b": 0.0})
    back = CaseMetrics.from_dict(m.to_dict())
    assert back.case_id == "c1" and back.hd95 is None and math.isnan(back.dice["b"]) and back.dice["a"] == 0.5


def test_format_class_table():
    table = format_class_table({"liver": {"Dice": 0.91234}, "mean": {"Dice": math.nan}}, ["Dice", "HD95"])
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "class"
    assert "0.912" in lines[2] and lines[2].count("n/a") == 1  # missing HD95 cell
    assert lines[3].count("n/a") == 2
    assert len({len(line) for line in lines}) == 1  # padded columns line up in a terminal
