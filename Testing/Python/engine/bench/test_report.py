"""The report's arithmetic against values worked out by hand: group means, forgetting, seeds, cost ratios."""

from __future__ import annotations

import math

import pytest

from cimis.bench.ablation import ablation_rows, variant_title
from cimis.bench.report import BenchReport, forgetting_per_class, group_means, mean_std
from cimis.bench.results import Unit
from cimis.bench.schedule import parse_schedule
from cimis.data.classes import ClassSet

CLASSES = ClassSet.from_names(["a", "b", "c", "d"])
SCHEDULE = parse_schedule("2-1", CLASSES)  # steps: (a, b), (c,), (d,)
NAN = float("nan")


def _result(dice, seconds=1.0, memory=1000.0):
    return {"dice": dice, "seconds_per_iteration": seconds, "peak_memory_mb": memory, "training_wall_seconds": 60.0,
            "memory_measure": "test measure"}


def _report(methods=("ft", "x")) -> BenchReport:
    results = {
        Unit("base", 0, 0): _result({"a": 0.8, "b": 0.6}, 0.5, 900),
        Unit("base", 0, 1): _result({"a": 0.9, "b": 0.7}, 0.5, 900),
        Unit("ft", 1, 0): _result({"a": 0.2, "b": 0.4, "c": 0.9}, 1.0, 1000),
        Unit("ft", 2, 0): _result({"a": 0.1, "b": 0.0, "c": 0.3, "d": 0.8}, 1.2, 1100),
        Unit("ft", 1, 1): _result({"a": 0.4, "b": 0.2, "c": 0.7}, 1.1, 1050),
        Unit("ft", 2, 1): _result({"a": 0.3, "b": 0.2, "c": 0.5, "d": 0.6}, 0.9, 1000),
        Unit("x", 1, 0): _result({"a": 0.8, "b": 0.5, "c": 0.6}, 2.0, 1500),
        Unit("x", 2, 0): _result({"a": 0.7, "b": None, "c": 0.7, "d": 0.4}, 2.2, 1650),
        Unit("x", 1, 1): _result({"a": 0.6, "b": 0.5, "c": 0.5}, 2.3, 1600),
        # x, step 2, seed 1 has not run
    }
    return BenchReport(SCHEDULE, list(methods), [0, 1], results, {"identity": {"schedule": "2-1"}})


def test_mean_std_uses_the_sample_deviation_and_skips_missing_values():
    assert mean_std([0.3, 0.4, None, NAN]) == {"mean": pytest.approx(0.35), "std": pytest.approx(math.sqrt(0.005)), "n": 2}
    assert mean_std([0.3]) == {"mean": 0.3, "std": None, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_group_means():
    dice = {"a": 0.1, "b": 0.0, "c": 0.3, "d": 0.8}
    assert group_means(dice, SCHEDULE, 2) == pytest.approx({"step0": 0.05, "later": 0.55, "all": 0.3})
    assert group_means({"a": 0.8, "b": 0.6}, SCHEDULE, 0) == {"step0": pytest.approx(0.7), "later": None,
                                                            "all": pytest.approx(0.7)}


def test_forgetting_is_best_earlier_dice_minus_now():
    history = [{"a": 0.8, "b": 0.6}, {"a": 0.2, "b": 0.4, "c": 0.9}, {"a": 0.1, "b": 0.0, "c": 0.3, "d": 0.8}]
    assert forgetting_per_class(history, SCHEDULE, 2) == pytest.approx({"a": 0.7, "b": 0.6, "c": 0.6})
    assert forgetting_per_class(history, SCHEDULE, 1) == pytest.approx({"a": 0.6, "b": 0.2})
    # A class gaining Dice has negative forgetting; one without a value now is left out.
    history[2] = {"a": 0.9, "b": None, "c": 0.95, "d": 0.1}
    assert forgetting_per_class(history, SCHEDULE, 2) == pytest.approx({"a": -0.1, "c": -0.05})


def test_summary_over_seeds():
    summary = _report().summary()
    ft = summary["ft"][2]
    assert ft["all"]["seeds"] == pytest.approx({0: 0.3, 1: 0.4})
    assert ft["all"]["mean"] == pytest.approx(0.35) and ft["all"]["std"] == pytest.approx(math.sqrt(0.005))
    assert ft["step0"]["seeds"] == pytest.approx({0: 0.05, 1: 0.25})
    assert ft["later"]["mean"] == pytest.approx(0.55) and ft["later"]["std"] == pytest.approx(0.0)
    assert ft["forgetting"]["seeds"] == pytest.approx({0: 1.9 / 3, 1: 1.3 / 3})
    assert ft["forgetting"]["std"] == pytest.approx(math.sqrt(2 * 0.1 ** 2))
    # Step 0 is the shared base model for every method.
    assert summary["x"][0]["all"]["seeds"] == pytest.approx({0: 0.7, 1: 0.8})
    # x's class b has no Dice at step 2 (absent from prediction and reference): left out of its means.
    x = summary["x"][2]
    assert x["step0"]["seeds"] == pytest.approx({0: 0.7}) and x["all"]["seeds"] == pytest.approx({0: 0.6})
    assert x["forgetting"]["seeds"] == pytest.approx({0: 0.0}) and x["all"]["std"] is None


def test_per_class_and_missing_units():
    report = _report()
    per_class = report.per_class()
    assert per_class["ft"][1]["c"]["mean"] == pytest.approx(0.8)
    assert per_class["x"][2]["d"] == {"mean": 0.4, "std": None, "n": 1, "seeds": {0: 0.4}}
    assert report.missing_units() == ["seed1/x/step2"]
    assert report.forgetting_table()["ft"]["a"]["seeds"] == pytest.approx({0: 0.7, 1: 0.6})


def test_cost_ratios_to_ft():
    cost = _report().cost()
    assert cost["ft"]["seconds_per_iteration"] == pytest.approx(1.05)
    assert cost["x"]["seconds_per_iteration"] == pytest.approx(6.5 / 3)
    assert cost["x"]["seconds_ratio_to_ft"] == pytest.approx((6.5 / 3) / 1.05)
    assert cost["ft"]["peak_memory_mb"] == 1100 and cost["x"]["memory_ratio_to_ft"] == pytest.approx(1.5)
    assert cost["ft"]["seconds_ratio_to_ft"] == pytest.approx(1.0)
    assert cost["base"]["units"] == 2 and cost["x"]["training_seconds"] == pytest.approx(180.0)
    assert _report(methods=("x",)).cost()["x"]["seconds_ratio_to_ft"] is None  # no ft: no ratio


def test_markdown_and_terminal_show_the_figures():
    report = _report()
    text = report.to_markdown()
    assert "| ft" in text and "0.350 ± 0.071" in text  # ft, all classes after the last step
    assert "Incomplete: 1 unit(s)" in text and "seed1/x/step2" in text
    assert "0.350 ± 0.071" in report.terminal_summary()


def test_ablation_rows_compare_with_the_full_method():
    results = {Unit("base", 0, 0): _result({"a": 0.8, "b": 0.6})}
    for method, dice in (("pgcd-dapd", 0.5), ("pgcd-dapd-no-spatial-weight", 0.4)):
        results[Unit(method, 1, 0)] = _result({"a": dice, "b": dice, "c": dice})
        results[Unit(method, 2, 0)] = _result({"a": dice, "b": dice, "c": dice, "d": dice})
    report = BenchReport(SCHEDULE, ["pgcd-dapd", "pgcd-dapd-no-spatial-weight"], [0], results, {})
    rows = ablation_rows(report)
    assert rows["pgcd-dapd"]["delta_all"] == pytest.approx(0.0)
    assert rows["pgcd-dapd-no-spatial-weight"]["delta_all"] == pytest.approx(-0.1)
    assert variant_title("pgcd-dapd-no-spatial-weight") == "without PGCD spatial weight"


# ------------------------------------------------------------------ differences smaller than the spread
def test_within_spread_by_hand():
    from cimis.bench.report import unresolved, within_spread

    a = {"mean": 0.80, "std": 0.03, "n": 3}
    b = {"mean": 0.76, "std": 0.04, "n": 3}  # |0.04| < sqrt(0.0009 + 0.0016) = 0.05: not separated
    c = {"mean": 0.70, "std": 0.03, "n": 3}  # |0.10| > sqrt(0.0018) = 0.042: separated
    one_seed = {"mean": 0.79, "std": None, "n": 1}
    assert within_spread(a, b) and not within_spread(a, c) and not within_spread(a, one_seed)
    assert unresolved({"a": a, "b": b, "c": c, "s": one_seed}) == {"b"}
    # Forgetting: lower is better, so c is the best and a, b are compared with it.
    assert unresolved({"a": a, "b": b, "c": c}, lower_is_better=True) == set()


def test_the_report_marks_differences_smaller_than_the_seeds_spread():
    results = {Unit("base", 0, s): _result({"a": 0.9, "b": 0.9}) for s in (0, 1)}
    for seed, (ft, x) in enumerate([(0.50, 0.52), (0.60, 0.61)]):
        results[Unit("ft", 1, seed)] = _result({"a": ft, "b": ft, "c": ft})
        results[Unit("x", 1, seed)] = _result({"a": x, "b": x, "c": 0.9})
    report = BenchReport(parse_schedule("2-1", ClassSet.from_names(["a", "b", "c"])), ["ft", "x"], [0, 1], results,
                         {"identity": {"schedule": "2-1"}})
    marks = report.within_spread_of_best()["1"]
    assert marks["step0"] == ["ft"]  # 0.55 ± 0.07 against x's 0.565 ± 0.064: not separated
    assert marks["c"] == []  # x's 0.9 ± 0 against ft's 0.55 ± 0.07: separated
    text = report.to_markdown()
    assert "0.550 ± 0.071 ≈" in text and "≈: differs from the best method" in text
    assert report.to_json()["within_spread_of_best"]["1"]["step0"] == ["ft"]
