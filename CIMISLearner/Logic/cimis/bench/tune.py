"""``cimis bench --tune``: one tuning protocol for every method, on validation data only.

Every method gets the same small grid (the step's learning rate as a factor, the head init, and the
method's main weight as a factor of its current value; method_settings.json names the main weight), the
same budget (the benchmark's step iterations), the same start (the benchmark's base model of the first
seed) and the same task (step 1 of the schedule). Each candidate is scored on the **validation** split,
never the test split: the mean Dice over every class known after step 1 (old and new alike). The best
candidate of each method (ties: the first in grid order) becomes its setting in ``tuned_settings.json``,
a method-settings file for ``cimis bench --method-settings`` (and ``cimis learn``), each value saying how it
was chosen. ``tune.md`` / ``tune.json`` hold every candidate's figures.

Layout under the benchmark folder: ``tune/runs/{method}/{candidate}/`` (the step's model),
``tune/results/{method}/{candidate}.json`` (its validation figures; present means done, so a rerun resumes).
"""

from __future__ import annotations

import datetime
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cimis.bench.config import write_json_atomic
from cimis.bench.results import BASE, Unit
from cimis.data.io import write_text_atomic
from cimis.errors import CimisError
from cimis.incremental.base import StepOptions
from cimis.incremental.method_settings import FORMAT as SETTINGS_FORMAT
from cimis.incremental.method_settings import LEARNING_RATE_FACTOR
from cimis.metrics import format_class_table

TUNE_FORMAT = "cimis-bench-tune/1"
TUNED_SETTINGS = "tuned_settings.json"
TUNE_STEP = 1


@dataclass(frozen=True)
class TuneGrid:
    """The grid every method is tuned on. ``weight_factors`` multiply the method's main weight as the
    settings file gives it; methods without a main weight (ft, pseudo-labels) try only the rest."""

    learning_rate_factors: tuple[float, ...] = (1.0, 0.3)
    head_inits: tuple[str, ...] = ("random", "balanced")
    weight_factors: tuple[float, ...] = (0.1, 1.0, 10.0)

    def __post_init__(self):
        if not (self.learning_rate_factors and self.head_inits and self.weight_factors):
            raise CimisError("the tuning grid has an empty axis", "give at least one value per axis")
        if any(not f > 0 for f in self.learning_rate_factors + self.weight_factors):
            raise CimisError("tuning factors must be positive numbers")
        unknown = set(self.head_inits) - {"random", "balanced"}
        if unknown:
            raise CimisError(f"unknown head init {sorted(unknown)[0]!r} in the tuning grid", "use random or balanced")

    def candidates(self, has_weight: bool) -> list["Candidate"]:
        weights = self.weight_factors if has_weight else (None,)
        return [Candidate(lr, init, w) for lr, init, w in itertools.product(self.learning_rate_factors,
                                                                              self.head_inits, weights)]


@dataclass(frozen=True)
class Candidate:
    learning_rate_factor: float
    head_init: str
    weight_factor: float | None = None

    @property
    def key(self) -> str:
        weight = "" if self.weight_factor is None else f"_w{self.weight_factor:g}"
        return f"lr{self.learning_rate_factor:g}_{self.head_init}{weight}"


@dataclass
class TuneResult:
    method: str
    candidate: Candidate
    settings: dict  # the method's settings this candidate ran with
    dice: dict = field(default_factory=dict)  # per class, on the validation split
    old: float | None = None
    new: float | None = None
    score: float | None = None


def tunable_methods(bench) -> list:
    """The benchmark's plain strategies that learn a step from the previous model (joint trains from
    scratch; an ablated variant runs with its strategy's tuned settings, so it is not tuned apart)."""
    return [m for m in bench.methods if m.strategy != "joint" and not m.off]


def run_tuning(bench, grid: TuneGrid, progress: bool = True) -> dict[str, Path]:
    """Tune every method of ``bench`` on its validation split; write the tuned settings and the table."""
    from cimis.bench.runner import train_unit

    if "val" not in bench.manifest.splits or not any(c.label is not None for c in bench.manifest.cases_in("val")):
        raise CimisError(f"dataset {bench.manifest.name!r} has no labelled validation case",
                         "tuning chooses on the validation split: list some cases under splits.val")
    if len(bench.schedule.steps) <= TUNE_STEP:
        raise CimisError("the schedule has no incremental step to tune on", "give a schedule with at least two steps")
    seed = bench.config.seeds[0]
    # The same base model the benchmark's methods start from, trained but not evaluated on the test split.
    train_unit(bench, Unit(BASE, 0, seed), progress)
    results = []
    for method in tunable_methods(bench):
        main_weight = bench.settings.main_weight.get(method.strategy)
        for candidate in grid.candidates(main_weight is not None):
            results.append(_tune_one(bench, method, candidate, main_weight, seed, progress))
    return _write(bench, grid, results, seed)


def _candidate_settings(bench, strategy: str, candidate: Candidate, main_weight: str | None) -> dict:
    settings = bench.settings.of(strategy)
    settings["head_init"] = candidate.head_init
    settings[LEARNING_RATE_FACTOR] = settings.get(LEARNING_RATE_FACTOR, 1.0) * candidate.learning_rate_factor
    if main_weight is not None:
        settings[main_weight] = settings[main_weight] * candidate.weight_factor
    return settings


def _tune_one(bench, method, candidate: Candidate, main_weight: str | None, seed: int, progress: bool) -> TuneResult:
    from cimis.bench.runner import _method, _step_config, _step_dataset
    from cimis.incremental.learn import learn_step
    from cimis.model.modelfile import load_card
    from cimis.story import evaluate_model

    settings = _candidate_settings(bench, method.strategy, candidate, main_weight)
    path = bench.out / "tune" / "results" / method.name / f"{candidate.key}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        return TuneResult(method.name, candidate, settings, stored["dice"], stored["old"], stored["new"], stored["score"])
    run_dir = bench.out / "tune" / "runs" / method.name / candidate.key
    base_model = Unit(BASE, 0, seed).run_dir(bench.out) / "model"
    new = list(bench.schedule.steps[TUNE_STEP])
    data = _step_dataset(bench, TUNE_STEP, new, "new-only")
    config = _step_config(bench.config, load_card(base_model), seed, bench.device, settings[LEARNING_RATE_FACTOR])
    explicit = {k: v for k, v in settings.items() if k != LEARNING_RATE_FACTOR}
    options = StepOptions.from_json({**{s: False for s in _method(bench, method.name).off}, **explicit})
    if progress:
        print(f"[{datetime.datetime.now():%H:%M:%S}] tune {method.name} {candidate.key}", flush=True)
    if not (run_dir / "model" / "card.json").is_file():
        learn_step(base_model, data, run_dir, new, method.strategy, config, options,
                   resume=(run_dir / "checkpoint").is_dir(), overwrite=True, progress=progress,
                   method_settings=bench.settings)
    report = evaluate_model(run_dir / "model", bench.manifest, "val", str(bench.device))
    dice = {k: (float(v) if np.isfinite(v) else None) for k, v in report.mean_dice().items()}
    old = _mean(dice, bench.schedule.step0)
    new_mean = _mean(dice, new)
    score = _mean(dice, bench.schedule.known_after(TUNE_STEP))
    write_json_atomic(path, {"format": TUNE_FORMAT, "method": method.name, "candidate": candidate.key,
                             "settings": settings, "learning_rate": config.learning_rate,
                             "iterations": config.iterations, "seed": seed, "split": "val",
                             "dice": dice, "old": old, "new": new_mean, "score": score})
    return TuneResult(method.name, candidate, settings, dice, old, new_mean, score)


def _mean(dice: dict, names) -> float | None:
    values = [dice.get(n) for n in names]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def best_per_method(results: list[TuneResult]) -> dict[str, TuneResult]:
    """The candidate with the highest validation score per method; the first in grid order on a tie."""
    best: dict[str, TuneResult] = {}
    for r in results:
        current = best.get(r.method)
        if r.score is not None and (current is None or current.score is None or r.score > current.score):
            best[r.method] = r
        elif current is None:
            best[r.method] = r
    return best


def _write(bench, grid: TuneGrid, results: list[TuneResult], seed: int) -> dict[str, Path]:
    best = best_per_method(results)
    protocol = (f"cimis bench --tune: step {TUNE_STEP} of schedule {bench.config.schedule} from the base model of "
                f"seed {seed}, {bench.config.step_iterations or 'step 0s'} iterations, grid learning-rate factors "
                f"{list(grid.learning_rate_factors)}, head inits {list(grid.head_inits)}, main-weight factors "
                f"{list(grid.weight_factors)}; chosen on the validation split's mean Dice over all "
                f"{len(bench.schedule.known_after(TUNE_STEP))} classes")
    methods_json = {}
    strategies = {m.name: m.strategy for m in bench.methods}
    for name, r in best.items():
        strategy = strategies[name]
        previous = bench.settings.of(strategy)
        entries = {}
        for key, value in r.settings.items():
            was = previous.get(key)
            entries[key] = {"value": value, "source": f"{protocol}: {r.candidate.key}, validation score "
                            f"{_fmt(r.score)} (before tuning: {was}, {bench.settings.sources[strategy].get(key, 'unset')})"}
        methods_json[strategy] = entries
    # Methods not tuned keep their values and sources.
    for strategy, values in bench.settings.values.items():
        if strategy not in methods_json:
            methods_json[strategy] = {k: {"value": v, "source": bench.settings.sources[strategy][k]}
                                      for k, v in values.items()}
    out = bench.out
    paths = {"settings": write_json_atomic(out / TUNED_SETTINGS, {
        "format": SETTINGS_FORMAT, "about": f"Tuned by {protocol}.", "methods": methods_json,
        "main_weight": dict(bench.settings.main_weight)})}
    paths["json"] = write_json_atomic(out / "tune.json", {
        "format": TUNE_FORMAT, "protocol": protocol, "chosen": {m: r.candidate.key for m, r in best.items()},
        "candidates": [{"method": r.method, "candidate": r.candidate.key, "settings": r.settings, "old": r.old,
                        "new": r.new, "score": r.score, "dice": r.dice} for r in results]})
    rows = {}
    for r in results:
        mark = " (chosen)" if best[r.method] is r else ""
        rows[f"{r.method} {r.candidate.key}{mark}"] = {"old": r.old, "new": r.new, "all (score)": r.score}
    table = format_class_table(rows, ["old", "new", "all (score)"], "method, candidate")
    paths["md"] = out / "tune.md"
    write_text_atomic(paths["md"], f"# Tuning on the validation split\n\n{protocol}.\n\n{table}\n\n"
                           f"Chosen settings: `{TUNED_SETTINGS}` (use with `--method-settings`).\n", overwrite=True)
    return paths


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
