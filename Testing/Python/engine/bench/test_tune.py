"""``cimis bench --tune`` end to end on a tiny grid and tiny hard phantoms: every method gets the same
grid and budget, the choice is the best validation score, the test split is never evaluated, and the
tuned settings file is what ``--method-settings`` (and ``cimis learn``) read. Also the pseudo-label
error measurement on the same data, and a benchmark with ``--seeds 2``."""

from __future__ import annotations

import json

import pytest

import cimis.story
from cimis.bench.pseudo_label_errors import pseudo_label_errors
from cimis.cli import main
from cimis.data.manifest import Manifest
from cimis.incremental.method_settings import load_method_settings

SCHEDULE = "spleen,liver,left kidney/stomach"
ARGS = ["bench", "--dataset", "phantoms", "--phantom-cases", "5", "--phantom-spacing", "10",
        "--phantom-test-cases", "1", "--phantom-step-scanner", "other", "--schedule", SCHEDULE,
        "--methods", "ft,mib,pgcd-dapd-no-dapd-local", "--network", "small", "--spacing", "10",
        "--patch", "32,32,16", "--base-iterations", "2", "--step-iterations", "2", "--device", "cpu",
        "--threads", "1", "--quiet"]
GRID = ["--tune-lr-factors", "1", "--tune-head-inits", "random", "--tune-weight-factors", "0.5,2"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "out"
    splits = []
    real = cimis.story.evaluate_model
    patch = pytest.MonkeyPatch()

    def evaluate(model_dir, manifest, split, *args, **kwargs):
        splits.append(split)
        return real(model_dir, manifest, split, *args, **kwargs)

    patch.setattr(cimis.story, "evaluate_model", evaluate)
    code = main([*ARGS, *GRID, "--tune", "--seeds", "1", "--out", str(out)])
    patch.undo()
    return out, code, splits


def test_every_method_is_tuned_on_the_same_grid_and_the_validation_split_only(tuned):
    out, code, splits = tuned
    assert code == 0
    assert splits and set(splits) == {"val"}  # the test split is never touched
    assert not (out / "results").exists()  # the base model was trained, not evaluated
    tune = json.loads((out / "tune.json").read_text())
    keys = {(c["method"], c["candidate"]) for c in tune["candidates"]}
    # ft has no main weight: only the learning rate and head init axes; the ablated variant is not tuned.
    assert keys == {("ft", "lr1_random"), ("mib", "lr1_random_w0.5"), ("mib", "lr1_random_w2")}
    mib = {c["candidate"]: c for c in tune["candidates"] if c["method"] == "mib"}
    assert mib["lr1_random_w0.5"]["settings"]["kd_weight"] == 5.0 and mib["lr1_random_w2"]["settings"]["kd_weight"] == 20.0
    best = max(mib.values(), key=lambda c: c["score"])
    assert tune["chosen"]["mib"] == best["candidate"]
    for c in tune["candidates"]:  # the score is the mean over every class known after step 1
        values = [c["dice"][n] for n in ("spleen", "liver", "left kidney", "stomach") if c["dice"][n] is not None]
        assert c["score"] == pytest.approx(sum(values) / len(values))
    stored = json.loads((out / "tune" / "results" / "mib" / f"{best['candidate']}.json").read_text())
    assert stored["split"] == "val" and stored["iterations"] == 2


def test_the_tuned_settings_are_a_method_settings_file_with_sources(tuned):
    out, _, _ = tuned
    settings = load_method_settings(out / "tuned_settings.json")
    chosen = json.loads((out / "tune.json").read_text())["chosen"]
    factor = {"lr1_random_w0.5": 0.5, "lr1_random_w2": 2.0}[chosen["mib"]]
    assert settings.values["mib"]["kd_weight"] == 10.0 * factor
    assert settings.values["mib"]["head_init"] == "random"
    assert "validation" in settings.sources["mib"]["kd_weight"]
    assert settings.values["plop"] == load_method_settings().values["plop"]  # not tuned: kept as it was
    assert "(chosen)" in (out / "tune.md").read_text()


def test_the_steps_learn_from_the_other_scanners_volumes(tuned):
    out, _, _ = tuned
    phantoms = Manifest.load(out / "data" / "phantoms" / "manifest.json")
    step = Manifest.load(out / "data" / "new-only" / "step1" / "step.json")
    assert [c.id for c in step.cases_in("train")] == phantoms.splits["train_steps"]
    assert set(phantoms.splits["train"]).isdisjoint(phantoms.splits["train_steps"])


def test_pseudo_label_errors_on_both_scanners(tuned):
    out, _, _ = tuned
    phantoms = Manifest.load(out / "data" / "phantoms" / "manifest.json")
    base = out / "runs" / "seed0" / "base" / "step0" / "model"
    for split in ("train", "train_steps"):
        figures = pseudo_label_errors(base, phantoms, split)
        assert figures["cases"] == len(phantoms.splits[split])
        assert figures["voxels"] == sum(c["voxels"] for c in figures["per_case"].values()) > 0
        for key in ("wrong", "ignored", "old_organ_wrong"):
            assert 0.0 <= figures[key] <= 1.0
        assert set(figures["per_class"]) == {"spleen", "liver", "left kidney"}


def test_a_benchmark_runs_with_the_tuned_settings_and_two_seeds(tuned, tmp_path, capsys):
    out, _, _ = tuned
    bench = tmp_path / "bench"
    code = main([*ARGS, "--methods", "mib", "--seeds", "2", "--method-settings", str(out / "tuned_settings.json"),
                 "--no-predictions", "--out", str(bench)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((bench / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    assert report["config"]["identity"]["method_settings"]["mib"] == load_method_settings(out / "tuned_settings.json").values["mib"]
    cell = report["summary"]["mib"]["1"]["all"]
    assert cell["n"] == 2 and cell["std"] is not None
    card = json.loads((bench / "runs" / "seed1" / "mib" / "step1" / "model" / "card.json").read_text())
    assert card["history"][-1]["options"]["kd_weight"] == load_method_settings(out / "tuned_settings.json").values["mib"]["kd_weight"]
