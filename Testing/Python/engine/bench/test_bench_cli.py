"""``cimis bench`` end to end on a tiny configuration: the report's structure, every number traced back to an
evaluation that ran, and resuming (an interrupted run finishes without recomputing finished units).

The configuration: four 8 mm phantoms (two train, one val, one test), the small network on 32x32x16 patches,
a base model on four organs, then two steps (two organs, one organ) with ft and pgcd-dapd, one seed, a few
iterations each. The first run is interrupted in the middle of a step's training; the second finishes it;
the third finds nothing to do; the fourth re-evaluates a unit whose result file was lost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import cimis.bench.runner as runner
from cimis.bench.results import RESULT_FORMAT
from cimis.cli import main
from cimis.data.manifest import Manifest
from cimis.evaluate import evaluate_folder

SCHEDULE = "spleen,liver,aorta,left kidney/right kidney,stomach/pancreas"
STEPS = [["spleen", "liver", "aorta", "left kidney"], ["right kidney", "stomach"], ["pancreas"]]
METHODS = ["ft", "pgcd-dapd"]
ARGS = ["bench", "--dataset", "phantoms", "--phantom-cases", "4", "--phantom-spacing", "8",
        "--phantom-test-cases", "1", "--schedule", SCHEDULE, "--methods", ",".join(METHODS), "--seeds", "1",
        "--network", "small", "--spacing", "8", "--patch", "32,32,16", "--base-iterations", "3",
        "--step-iterations", "4", "--device", "cpu", "--threads", "1", "--quiet"]
UNITS = ["seed0/base/step0", "seed0/ft/step1", "seed0/pgcd-dapd/step1", "seed0/ft/step2", "seed0/pgcd-dapd/step2"]


class Interrupt(KeyboardInterrupt):
    pass


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    results = out / "results"
    return {str(p.relative_to(results)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(results.rglob("*.json"))}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Runs the benchmark three times (interrupted, resumed, repeated), recording which units each run trained."""
    out = tmp_path_factory.mktemp("bench") / "out"
    patch = pytest.MonkeyPatch()
    calls: list[list[tuple[str, bool]]] = []
    real_learn, real_train = runner.learn_step, runner.train_model

    def learn(previous, manifest, run_dir, new, strategy, config, options, resume, progress, interrupt=False,
              **kwargs):
        calls[-1].append((str(Path(run_dir).relative_to(out / "runs")), resume))

        def on_event(kind, payload):
            if interrupt and kind == "checkpoint":
                raise Interrupt()  # as if Ctrl-C came right after the first checkpoint

        return real_learn(previous, manifest, run_dir, new, strategy, config, options, resume=resume,
                          progress=progress, on_event=on_event, **kwargs)

    def train(manifest, run_dir, *args, resume=False, **kwargs):
        calls[-1].append((str(Path(run_dir).relative_to(out / "runs")), resume))
        return real_train(manifest, run_dir, *args, resume=resume, **kwargs)

    patch.setattr(runner, "train_model", train)
    runs = []
    for run, interrupt_at in enumerate(("seed0/ft/step2", None, None, None)):
        if run == 3:  # as if the process had stopped between saving a model and storing its evaluation
            lost = out / "results" / "seed0" / "pgcd-dapd" / "step2.json"
            runs[-1]["lost"] = json.loads(lost.read_text())
            lost.unlink()
        calls.append([])
        patch.setattr(runner, "learn_step", lambda *a, **k: learn(
            *a, **k, interrupt=interrupt_at is not None and str(a[2]).endswith(interrupt_at)))
        before = _snapshot(out) if (out / "results").exists() else {}
        code = main([*ARGS, "--out", str(out)])
        runs.append({"code": code, "before": before, "after": _snapshot(out), "calls": calls[-1],
                     "checkpoint_left": (out / "runs" / "seed0" / "ft" / "step2" / "checkpoint").is_dir()})
    patch.undo()
    return out, runs


def test_an_interrupted_run_resumes_without_recomputing(bench):
    out, (first, second, third, _) = bench
    assert first["code"] == 130  # interrupted
    assert sorted(first["after"]) == sorted(f"{u}.json" for u in UNITS[:3])
    assert first["checkpoint_left"]
    assert second["code"] == 0
    # Only the unfinished units were trained: the interrupted one from its checkpoint, the last one afresh.
    assert second["calls"] == [("seed0/ft/step2", True), ("seed0/pgcd-dapd/step2", False)]
    assert sorted(second["after"]) == sorted(f"{u}.json" for u in UNITS)
    for name, content in first["after"].items():
        assert second["after"][name] == content, f"{name} was rewritten"
    assert third["code"] == 0 and third["calls"] == [] and third["after"] == second["after"]


def test_a_unit_with_a_saved_model_is_only_evaluated_again(bench):
    _, (*_, third, fourth) = bench
    assert fourth["code"] == 0 and fourth["calls"] == []  # nothing trained
    again = json.loads(fourth["after"]["seed0/pgcd-dapd/step2.json"][0])
    assert again["dice"] == third["lost"]["dice"] and again["seconds_per_iteration"] == third["lost"]["seconds_per_iteration"]
    for name, content in third["after"].items():
        if name != "seed0/pgcd-dapd/step2.json":
            assert fourth["after"][name] == content


def _results(out: Path) -> dict[str, dict]:
    return {u: json.loads((out / "results" / f"{u}.json").read_text()) for u in UNITS}


def test_every_unit_result_comes_from_its_own_evaluation(bench):
    out, _ = bench
    manifest = Manifest.load(out / "data" / "phantoms" / "manifest.json")
    for unit, result in _results(out).items():
        step = int(unit[-1])
        assert result["format"] == RESULT_FORMAT and result["step"] == step
        assert result["classes"] == [c for s in STEPS[: step + 1] for c in s]
        # Its Dice is the mean over the evaluated cases...
        cases = result["evaluation"]["cases"]
        assert [c["case_id"] for c in cases] == manifest.splits["test"]
        for name, value in result["dice"].items():
            per_case = [c["dice"][name] for c in cases if c["dice"][name] is not None]
            assert value == pytest.approx(np.mean(per_case)) if per_case else value is None
        # ... and those are what an independent evaluation of its saved predictions finds.
        again = evaluate_folder(out / "data" / "phantoms" / "manifest.json", "test", out / result["predictions"])
        recomputed = again.mean_dice()
        for name, value in result["dice"].items():
            assert (value is None and math.isnan(recomputed[name])) or recomputed[name] == pytest.approx(value)
        assert result["seconds_per_iteration"] > 0 and result["peak_memory_mb"] > 100
        assert result["iterations"] == (3 if step == 0 else 4)


def test_report_numbers_are_the_unit_results(bench):
    out, _ = bench
    results = _results(out)
    report = json.loads((out / "report.json").read_text())
    assert report["missing_units"] == []
    assert report["units"] == {u: f"results/{u}.json" for u in UNITS}
    assert report["schedule"] == STEPS and report["methods"] == METHODS
    for method in METHODS:
        for step in range(3):
            unit = "seed0/base/step0" if step == 0 else f"seed0/{method}/step{step}"
            dice = results[unit]["dice"]
            cells = report["per_class"][method][str(step)]
            assert set(cells) == set(dice)
            for name, cell in cells.items():
                assert cell["seeds"] == ({} if dice[name] is None else {"0": dice[name]})
                assert cell["mean"] == dice[name] and cell["std"] is None
            known = [v for v in dice.values() if v is not None]
            assert report["summary"][method][str(step)]["all"]["mean"] == pytest.approx(np.mean(known))
        last, base = results[f"seed0/{method}/step2"]["dice"], results["seed0/base/step0"]["dice"]
        middle = results[f"seed0/{method}/step1"]["dice"]
        forgetting = [max(v for v in (base.get(c), middle[c]) if v is not None) - last[c]
                      for c in STEPS[0] + STEPS[1] if last[c] is not None and (base.get(c) or middle[c]) is not None]
        assert report["summary"][method]["2"]["forgetting"]["mean"] == pytest.approx(np.mean(forgetting))
        cost = report["cost"][method]
        steps = [results[f"seed0/{method}/step{t}"] for t in (1, 2)]
        assert cost["seconds_per_iteration"] == pytest.approx(np.mean([r["seconds_per_iteration"] for r in steps]))
        assert cost["peak_memory_mb"] == max(r["peak_memory_mb"] for r in steps)
    assert report["cost"]["ft"]["seconds_ratio_to_ft"] == pytest.approx(1.0)
    assert report["memory_measure"] and "resident" in report["memory_measure"][0]


def test_report_files(bench):
    out, _ = bench
    results = _results(out)
    markdown = (out / "report.md").read_text()
    for heading in ("After the last step (step 2)", "Mean Dice", "Forgetting per class after step 2", "Cost"):
        assert heading.lower() in markdown.lower()
    for method in METHODS:
        value = np.mean([v for v in results[f"seed0/{method}/step2"]["dice"].values() if v is not None])
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} "))
        assert f"{value:.3f}" in row
    rows = (out / "report_per_class.csv").read_text().splitlines()
    assert rows[0] == "seed,method,step,class,learned_at_step,dice"
    assert len(rows) - 1 == 4 + len(METHODS) * (6 + 7)
    for line in rows[1:]:
        seed, method, step, name, learned, dice = line.split(",")
        unit = f"seed{seed}/{method}/step{step}"
        assert dice == ("" if results[unit]["dice"][name] is None else repr(results[unit]["dice"][name]))
    assert (out / "report_summary.csv").read_text().startswith("method,step,figure,mean,std,n_seeds")
    for png in ("mean_dice_per_step.png", "last_step_per_class.png"):
        picture = matplotlib.image.imread(out / png)
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 400
        assert picture[..., :3].std() > 0.05  # not a blank canvas


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_folder_of_another_configuration_is_refused(bench, capsys):
    out, runs = bench
    before = _snapshot(out)
    code, _, err = _run(capsys, *_with(ARGS, {"--base-iterations": "5"}), "--out", out)
    assert code == 2 and "different configuration (differs in: base_iterations)" in _one_error_line(err)
    assert _snapshot(out) == before


def _with(args: list[str], changes: dict[str, str]) -> list[str]:
    args = list(args)
    for option, value in changes.items():
        args[args.index(option) + 1] = value
    return args


@pytest.mark.parametrize("changes, flags, words", [
    ({"--schedule": "spleen/kidney"}, [], "unknown class 'kidney'"),
    ({"--methods": "ft,magic"}, [], "unknown method 'magic'"),
    ({"--seeds": "1,1"}, [], "distinct"),
    ({"--seeds": "0"}, [], "no seed to run"),
    ({}, ["--report-only"], "holds no benchmark"),
    ({}, ["--full", "--btcv", "/nonexistent"], "does not exist"),
    ({}, ["--phantom-val-cases", "3"], "leaves no training case"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, changes, flags, words):
    code, _, err = _run(capsys, *_with(ARGS, changes), *flags, "--out", tmp_path / "new")
    assert code == 2 and words in _one_error_line(err)


def test_the_validation_cases_reach_the_phantoms(tmp_path):
    from cimis.bench.command import configs_from
    from cimis.cli import build_parser

    args = build_parser().parse_args([*ARGS, "--phantom-val-cases", "2", "--out", str(tmp_path / "b")])
    [(_, config)] = configs_from(args)
    assert (config.phantoms.cases, config.phantoms.val_cases, config.phantoms.test_cases) == (4, 2, 1)


def test_a_folder_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, *ARGS, "--out", tmp_path)
    assert code == 2 and "does not hold a benchmark" in _one_error_line(err)
    assert os.listdir(tmp_path) == ["notes.txt"]
