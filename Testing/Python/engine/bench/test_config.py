"""Method names, and the output folder's claim: one benchmark identity per folder, selections may grow."""

from __future__ import annotations

import json

import pytest

from cimis.bench.config import BenchConfig, claim_output_folder
from cimis.bench.methods import ABLATION_SWITCHES, ablation_methods, inert_switches, parse_method, parse_methods
from cimis.errors import CimisError
from cimis.incremental.base import StepOptions


def test_method_names_carry_their_switches():
    method = parse_method("pgcd-dapd-no-spatial-weight-no-dapd-local")
    assert method.strategy == "pgcd-dapd" and method.off == ("spatial_weight", "dapd_local")
    options = method.options()
    assert not options.spatial_weight and not options.dapd_local and options.pseudo_labels
    assert parse_method("ft").off == () and parse_method("ft").options().spatial_weight


def test_ablation_switches_are_the_step_options_of_method_md_section_7():
    defaults = StepOptions()
    assert all(getattr(defaults, switch) is True for switch in ABLATION_SWITCHES)  # all on in pgcd-dapd
    assert len(ABLATION_SWITCHES) == 7


def test_ablation_turns_each_switch_that_matters_off_once():
    names = ablation_methods()
    assert names[0] == "pgcd-dapd"
    # The channel weight only weighs the feature term, off by default (lambda_f = 0): not run.
    assert inert_switches() == ("channel_weight",)
    assert sorted(s for n in names[1:] for s in parse_method(n).off) == sorted(set(ABLATION_SWITCHES) - {"channel_weight"})
    assert inert_switches(StepOptions(lambda_f=0.1)) == ()


@pytest.mark.parametrize("names, words", [
    (["magic"], "unknown method 'magic'"),
    (["pgcd-dapd-no-magic"], "unknown switch 'magic'"),
    (["ft", "ft"], "listed twice"),
    ([" "], "no method"),
])
def test_bad_methods_are_refused(names, words):
    with pytest.raises(CimisError, match=words):
        parse_methods(names)


def _stored(**changes) -> dict:
    return BenchConfig(**changes).to_json("cpu", "fingerprint")


def test_a_folder_keeps_one_identity_and_lets_the_selection_grow(tmp_path):
    out = tmp_path / "bench"
    claim_output_folder(out, _stored(methods=["ft"], seeds=[0]))
    claim_output_folder(out, _stored(methods=["ft", "pgcd-dapd"], seeds=[0, 1]))  # more methods and seeds: fine
    assert json.loads((out / "bench.json").read_text())["seeds"] == [0, 1]
    with pytest.raises(CimisError, match=r"different configuration \(differs in: schedule, step_iterations\)"):
        claim_output_folder(out, _stored(schedule="7-6", step_iterations=10))
    assert json.loads((out / "bench.json").read_text())["identity"]["schedule"] == "7-3"  # left as it was


def test_a_folder_of_other_files_is_refused_but_interrupted_phantoms_are_not(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CimisError, match="does not hold a benchmark"):
        claim_output_folder(tmp_path / "other", _stored())
    # A run interrupted while generating its phantoms left only data/phantoms: the folder is still ours.
    (tmp_path / "ours" / "data" / "phantoms").mkdir(parents=True)
    claim_output_folder(tmp_path / "ours", _stored())
    assert (tmp_path / "ours" / "bench.json").is_file()


@pytest.mark.parametrize("changes, words", [
    ({"seeds": []}, "no seed"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"base_iterations": 0}, "at least 1"),
    ({"step_lr": -1.0}, "positive"),
    ({"dataset": "btcv"}, "needs the folder"),
    ({"dataset": "/nowhere/manifest.json"}, "neither"),
])
def test_bad_settings_are_refused(changes, words):
    with pytest.raises(CimisError, match=words):
        BenchConfig(**changes)
