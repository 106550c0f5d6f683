"""The benchmark's report: every number computed from the stored unit results, as Markdown, CSV and JSON.

Definitions (METHOD.md section 9), per method and seed, after step ``t``:

- per-class Dice: the mean over the test cases of the class's Dice (cases where the class is absent from
  both prediction and reference do not count);
- step-0 classes, later classes, all: means of the per-class Dice over the classes of step 0, over those
  added at steps ``1..t``, and over both;
- forgetting of a class learned before ``t``: its best Dice at any step from the one that learned it to
  ``t - 1``, minus its Dice after ``t``; the mean forgetting is over those classes.

Across seeds every figure is given as mean and sample standard deviation (n - 1 in the denominator; "n/a"
with one seed). Cost per method: training seconds per iteration (mean over its units, steps >= 1) and peak
memory (the largest over its units), each also as a ratio to ``ft``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cimis.bench.config import write_json_atomic
from cimis.bench.results import BASE, Unit, unit_for
from cimis.bench.schedule import Schedule
from cimis.data.io import csv_writer_atomic, write_text_atomic
from cimis.metrics import format_class_table

REPORT_FORMAT = "cimis-bench-report/1"
GROUPS = ("step0", "later", "all", "forgetting")
GROUP_TITLES = {"step0": "step-0 classes", "later": "later classes", "all": "all classes", "forgetting": "forgetting"}
REFERENCE_METHOD = "ft"


# ------------------------------------------------------------------------------------------ the maths
def mean_std(values) -> dict:
    """Mean and sample standard deviation of the finite values: ``{"mean", "std", "n"}`` (None when undefined)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    mean = float(np.mean(finite)) if n else None
    std = float(np.std(finite, ddof=1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n}


def _mean(values) -> float | None:
    return mean_std(values)["mean"]


def within_spread(a: dict, b: dict) -> bool:
    """Whether two methods' figures (``mean_std`` dicts over seeds) differ by less than their spread:
    ``|mean_a - mean_b| < sqrt(std_a^2 + std_b^2)``, the standard deviation of the difference between one
    run of each. False when either has fewer than two seeds (no spread to compare with)."""
    if a["std"] is None or b["std"] is None or a["mean"] is None or b["mean"] is None:
        return False
    return abs(a["mean"] - b["mean"]) < math.sqrt(a["std"] ** 2 + b["std"] ** 2)


def unresolved(cells: dict[str, dict], lower_is_better: bool = False) -> set[str]:
    """The methods whose figure differs from the column's best by less than the seeds' spread
    (:func:`within_spread`); the best itself is not listed."""
    scored = {m: c for m, c in cells.items() if c["mean"] is not None}
    if not scored:
        return set()
    pick = min if lower_is_better else max
    best = pick(scored, key=lambda m: scored[m]["mean"])
    return {m for m, c in scored.items() if m != best and within_spread(c, scored[best])}


SPREAD_MARK = " ≈"
SPREAD_LEGEND = ("≈: differs from the best method of its column by less than the seeds' spread "
                 "(|difference of means| < √(std₁² + std₂²)); these seeds do not separate the two.")


def group_means(dice: dict[str, float | None], schedule: Schedule, step: int) -> dict[str, float | None]:
    """Mean Dice over the step-0 classes, the classes added at steps ``1..step`` and all of them."""
    later = [c for s in schedule.steps[1: step + 1] for c in s]
    return {
        "step0": _mean(dice.get(c) for c in schedule.step0),
        "later": _mean(dice.get(c) for c in later) if later else None,
        "all": _mean(dice.get(c) for c in schedule.known_after(step)),
    }


def forgetting_per_class(dice_by_step: list[dict[str, float | None]], schedule: Schedule, step: int) -> dict[str, float]:
    """Per class learned before ``step``: best Dice at the steps from its own to ``step - 1``, minus its Dice
    after ``step``. ``dice_by_step[u]`` is the per-class Dice after step ``u``. Classes without a finite
    value on either side are left out."""
    out = {}
    for name in schedule.known_after(step - 1) if step >= 1 else ():
        earlier = [dice_by_step[u].get(name) for u in range(schedule.step_of(name), step)]
        earlier = [v for v in earlier if v is not None and math.isfinite(v)]
        now = dice_by_step[step].get(name)
        if earlier and now is not None and math.isfinite(now):
            out[name] = max(earlier) - now
    return out


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


# ------------------------------------------------------------------------------------------- the report
@dataclass
class BenchReport:
    """The figures of a benchmark, from the stored ``results`` of its units."""

    schedule: Schedule
    methods: list[str]
    seeds: list[int]
    results: dict[Unit, dict]
    stored: dict  # bench.json

    @property
    def steps(self) -> range:
        return range(len(self.schedule.steps))

    @property
    def last_step(self) -> int:
        return len(self.schedule.steps) - 1

    def expected_units(self) -> list[Unit]:
        units = [Unit(BASE, 0, s) for s in self.seeds]
        return units + [Unit(m, t, s) for s in self.seeds for t in self.steps[1:] for m in self.methods]

    def missing_units(self) -> list[str]:
        return [u.key for u in self.expected_units() if u not in self.results]

    def dice(self, method: str, step: int, seed: int) -> dict[str, float | None] | None:
        """Per-class Dice of ``method`` after ``step`` with ``seed``; None if that unit has not run."""
        result = self.results.get(unit_for(method, step, seed))
        return None if result is None else result["dice"]

    # -- per seed
    def _per_seed(self, method: str, step: int, figure) -> dict[int, float | None]:
        """``figure(dice_by_step)`` for each seed whose units up to ``step`` have all run."""
        out = {}
        for seed in self.seeds:
            history = [self.dice(method, u, seed) for u in range(step + 1)]
            if all(h is not None for h in history):
                out[seed] = figure(history)
        return out

    def per_class(self) -> dict:
        """``{method: {step: {class: {"mean", "std", "n", "seeds": {seed: dice}}}}}``."""
        table = {}
        for m in self.methods:
            table[m] = {}
            for t in self.steps:
                table[m][t] = {}
                for c in self.schedule.known_after(t):
                    seeds = self._per_seed(m, t, lambda h, c=c, t=t: h[t].get(c))
                    table[m][t][c] = {**mean_std(seeds.values()), "seeds": seeds}
        return table

    def summary(self) -> dict:
        """``{method: {step: {group: {"mean", "std", "n", "seeds"}}}}`` for the groups of :data:`GROUPS`."""
        table = {}
        for m in self.methods:
            table[m] = {}
            for t in self.steps:
                row = {}
                for group in ("step0", "later", "all"):
                    seeds = self._per_seed(m, t, lambda h, t=t, g=group: group_means(h[t], self.schedule, t)[g])
                    row[group] = {**mean_std(seeds.values()), "seeds": seeds}
                seeds = self._per_seed(m, t, lambda h, t=t: _mean(forgetting_per_class(h, self.schedule, t).values()))
                row["forgetting"] = {**mean_std(seeds.values()), "seeds": seeds}
                table[m][t] = row
        return table

    def forgetting_table(self, step: int | None = None) -> dict:
        """``{method: {class: {"mean", "std", "n", "seeds"}}}``: forgetting per class after ``step`` (default: the last)."""
        step = self.last_step if step is None else step
        table = {}
        for m in self.methods:
            table[m] = {}
            for c in self.schedule.known_after(step - 1):
                seeds = self._per_seed(m, step, lambda h, c=c: forgetting_per_class(h, self.schedule, step).get(c))
                table[m][c] = {**mean_std(seeds.values()), "seeds": seeds}
        return table

    def cost(self) -> dict:
        """Per method (and for the shared base model): training seconds per iteration, peak memory, total
        training time, each from the units that ran, with ratios to ``ft``."""
        table = {}
        for m in [BASE, *self.methods]:
            units = [u for u in self.results if u.method == m and u.seed in self.seeds]
            results = [self.results[u] for u in units]
            seconds = [r.get("training_wall_seconds") for r in results]
            table[m] = {
                "seconds_per_iteration": _mean(r.get("seconds_per_iteration") for r in results),
                "peak_memory_mb": max((r["peak_memory_mb"] for r in results if r.get("peak_memory_mb") is not None),
                                      default=None),
                "training_seconds": sum(s for s in seconds if s is not None) if results else None,
                "units": len(results),
            }
        reference = table.get(REFERENCE_METHOD, {})
        for row in table.values():
            row["seconds_ratio_to_ft"] = _ratio(row["seconds_per_iteration"], reference.get("seconds_per_iteration"))
            row["memory_ratio_to_ft"] = _ratio(row["peak_memory_mb"], reference.get("peak_memory_mb"))
        return table

    def memory_measures(self) -> list[str]:
        return sorted({r.get("memory_measure") for r in self.results.values() if r.get("memory_measure")})

    # -- output
    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "config": self.stored,
            "schedule": [list(s) for s in self.schedule.steps],
            "methods": self.methods,
            "seeds": self.seeds,
            "missing_units": self.missing_units(),
            "units": {u.key: f"results/{u.key}.json" for u in self.expected_units() if u in self.results},
            "per_class": _keys_to_str(self.per_class()),
            "summary": _keys_to_str(self.summary()),
            "forgetting_last_step": _keys_to_str(self.forgetting_table()),
            "cost": self.cost(),
            "within_spread_of_best": self.within_spread_of_best(),
            "memory_measure": self.memory_measures(),
            "std": "sample standard deviation over seeds (ddof=1); null with one seed",
        }

    def within_spread_of_best(self) -> dict:
        """``{step: {group or class: [methods]}}``: the methods whose figure is within the seeds' spread of
        the best method's (:func:`unresolved`)."""
        summary, per_class = self.summary(), self.per_class()
        out = {}
        for t in self.steps:
            row = {g: sorted(unresolved({m: summary[m][t][g] for m in self.methods}, g == "forgetting"))
                   for g in GROUPS}
            row.update({c: sorted(unresolved({m: per_class[m][t][c] for m in self.methods}))
                        for c in self.schedule.known_after(t)})
            out[str(t)] = row
        return out

    def to_markdown(self) -> str:
        cfg = self.stored.get("identity", {})
        t_last = self.last_step
        lines = [f"# Benchmark: {cfg.get('dataset')}, schedule {cfg.get('schedule')} ({self.schedule.describe()} classes)", ""]
        lines += [f"- step {t}: {', '.join(s)}" for t, s in enumerate(self.schedule.steps)]
        step_iterations = cfg.get("step_iterations") or "step 0's"
        step_lr = cfg.get("step_lr") or "cimis learn's default rate (step 0's)"
        lines += ["", f"Methods: {', '.join(self.methods)}. Seeds: {', '.join(map(str, self.seeds))}. "
                  f"Class order: {cfg.get('order')}. Network: {cfg.get('network')}, spacing {cfg.get('spacing')} mm, "
                  f"patch {cfg.get('patch')}, batch {cfg.get('batch_size')}. Budget: step 0 (and joint, which "
                  f"trains from scratch) {cfg.get('base_iterations')} iterations at {cfg.get('base_lr')}; later "
                  f"steps {step_iterations} iterations at {step_lr}. Device: {cfg.get('device')}.", "",
                  "Dice on the held-out test split" + (", mean ± sample std over seeds" if len(self.seeds) > 1 else "")
                  + "; step 0 is the base model every method starts from.", ""]
        missing = self.missing_units()
        if missing:
            lines += [f"**Incomplete: {len(missing)} unit(s) have not run: {', '.join(missing)}.**", ""]
        summary = self.summary()
        counts = {"step0": len(self.schedule.step0), "later": len(self.schedule.later),
                  "all": len(self.schedule.known_after(t_last))}
        columns = [f"{GROUP_TITLES[g]} ({counts[g]})" if g in counts else GROUP_TITLES[g] for g in GROUPS]
        marks = {g: unresolved({m: summary[m][t_last][g] for m in self.methods}, g == "forgetting") for g in GROUPS}
        rows = {m: dict(zip(columns, (_cell(summary[m][t_last][g], m in marks[g]) for g in GROUPS)))
                for m in self.methods}
        lines += [f"## After the last step (step {t_last})", "", format_class_table(rows, columns, "method"), ""]
        if len(self.seeds) > 1:
            lines += [SPREAD_LEGEND, ""]
        for group in GROUPS:
            steps = [t for t in self.steps if not (t == 0 and group in ("later", "forgetting"))]
            cols = [f"step {t}" for t in steps]
            step_marks = {t: unresolved({m: summary[m][t][group] for m in self.methods}, group == "forgetting")
                          for t in steps}
            rows = {m: {f"step {t}": _cell(summary[m][t][group], m in step_marks[t]) for t in steps}
                    for m in self.methods}
            title = {"step0": "Mean Dice over the step-0 classes", "later": "Mean Dice over the later classes",
                     "all": "Mean Dice over all classes", "forgetting": "Forgetting"}[group]
            lines += [f"## {title} after each step", "",
                      format_class_table(rows, cols, "method"), ""]
        per_class = self.per_class()
        for t in self.steps[1:]:
            rows = {}
            for c in self.schedule.known_after(t):
                close = unresolved({m: per_class[m][t][c] for m in self.methods})
                rows[c] = {m: _cell(per_class[m][t][c], m in close) for m in self.methods}
            lines += [f"## Per-class Dice after step {t}", "", format_class_table(rows, self.methods, "class"), ""]
        rows = {c: {BASE: _cell(per_class[self.methods[0]][0][c])} for c in self.schedule.step0}
        lines += ["## Per-class Dice of the base model (step 0)", "", format_class_table(rows, [BASE], "class"), ""]
        forgetting = self.forgetting_table()
        rows = {c: {m: _cell(forgetting[m][c]) for m in self.methods} for c in self.schedule.known_after(t_last - 1)}
        lines += [f"## Forgetting per class after step {t_last}", "", format_class_table(rows, self.methods, "class"), ""]
        lines += ["## Cost", "", self._cost_table(), "",
                  "Seconds per iteration: the training loop's own figure (mean over the method's steps); peak memory: "
                  + "; ".join(self.memory_measures()) + ". Training time: all of the method's steps, including the "
                  "start-of-step and end-of-step passes over the training data.", ""]
        return "\n".join(lines)

    def _cost_table(self) -> str:
        columns = ["s/iteration", "x ft", "peak memory (MiB)", "x ft (memory)", "training (min)", "units"]
        rows = {}
        for m, c in self.cost().items():
            rows[m] = {"s/iteration": c["seconds_per_iteration"], "x ft": c["seconds_ratio_to_ft"],
                       "peak memory (MiB)": _number(c["peak_memory_mb"], 0), "x ft (memory)": c["memory_ratio_to_ft"],
                       "training (min)": None if c["training_seconds"] is None else c["training_seconds"] / 60,
                       "units": str(c["units"])}
        return format_class_table(rows, columns, "method", digits=2)

    def terminal_summary(self) -> str:
        t_last = self.last_step
        summary = self.summary()
        columns = [GROUP_TITLES[g] for g in GROUPS]
        rows = {m: dict(zip(columns, (_cell(summary[m][t_last][g]) for g in GROUPS))) for m in self.methods}
        text = f"Dice on the test split after the last step (step {t_last})"
        text += ", mean ± std over seeds:\n" if len(self.seeds) > 1 else ":\n"
        text += format_class_table(rows, columns, "method") + "\n\nCost:\n" + self._cost_table()
        missing = self.missing_units()
        if missing:
            text += f"\n\nincomplete: {len(missing)} unit(s) have not run"
        return text

    def write(self, out: Path) -> dict[str, Path]:
        """Write report.md, report.json, report_per_class.csv and report_summary.csv into ``out``."""
        out = Path(out)
        paths = {"md": out / "report.md"}
        write_text_atomic(paths["md"], self.to_markdown(), overwrite=True)
        paths["json"] = write_json_atomic(out / "report.json", self.to_json())
        paths["per_class_csv"] = self._write_per_class_csv(out / "report_per_class.csv")
        paths["summary_csv"] = self._write_summary_csv(out / "report_summary.csv")
        return paths

    def _write_per_class_csv(self, path: Path) -> Path:
        with csv_writer_atomic(path) as writer:
            writer.writerow(["seed", "method", "step", "class", "learned_at_step", "dice"])
            for seed in self.seeds:
                for m in self.methods:
                    for t in self.steps:
                        dice = self.dice(m, t, seed)
                        if dice is None or (t == 0 and m != self.methods[0]):
                            continue
                        label = BASE if t == 0 else m
                        for c in self.schedule.known_after(t):
                            writer.writerow([seed, label, t, c, self.schedule.step_of(c), _csv(dice.get(c))])
        return path

    def _write_summary_csv(self, path: Path) -> Path:
        with csv_writer_atomic(path) as writer:
            writer.writerow(["method", "step", "figure", "mean", "std", "n_seeds"])
            for m, by_step in self.summary().items():
                for t, row in by_step.items():
                    for group in GROUPS:
                        cell = row[group]
                        writer.writerow([m, t, group, _csv(cell["mean"]), _csv(cell["std"]), cell["n"]])
        return path


def _cell(stat: dict, unresolved_difference: bool = False) -> str | float | None:
    if stat["mean"] is None:
        return None
    if stat["std"] is None:
        return stat["mean"]
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" + (SPREAD_MARK if unresolved_difference else "")


def _number(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _csv(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def _keys_to_str(data):
    """JSON object keys must be strings: steps and seeds become "0", "1", ..."""
    if isinstance(data, dict):
        return {str(k): _keys_to_str(v) for k, v in data.items()}
    return data
