"""Variants of one incremental step on the hard phantoms, scored on the validation split: issue 16 item 7.

The setting of ``cimis bench --quick --phantom-step-scanner other`` (BTCV 7-3 phantoms at 4 mm, the step's
volumes from another scanner, the small network, 400 base and 120 step iterations), but with four
validation cases (two per scanner) instead of one, so that a variant of PGCD or DAPD can be judged on
validation data before any default changes. Every variant learns step 1 (7 old organs, 3 new) from the
benchmark's base model of each seed; the test split is never read.

    python Testing/Benchmarks/hard_step_variants.py --out runs/hardval --seeds 0,1,2 \\
        --variant pseudo-labels --variant pgcd-dapd \\
        --variant "no-kd-weight=pgcd-dapd:spatial_weight=false" --variant "lo3=pgcd-dapd:lambda_o=3"

A variant is ``NAME=STRATEGY:OPTION=VALUE,...`` (or a strategy name alone); options are ``cimis learn
--option`` keys. The variant ``base`` scores the base model itself (its new-organ columns are empty), the
reference for forgetting. Results go to ``OUT/variants/NAME/seedS.json`` (present: skipped on a rerun); the table of
mean ± std over seeds (old and new organs, per scanner) is printed and written to ``OUT/variants.md``.
One torch thread (``OMP_NUM_THREADS=1``) lets two runs share two cores.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cimis.bench.config import PhantomData
from cimis.bench.presets import QUICK_PHANTOMS, quick_config
from cimis.bench.results import BASE, Unit
from cimis.bench.runner import _step_config, _step_dataset, prepare, train_unit
from cimis.incremental.base import StepOptions
from cimis.incremental.learn import learn_step
from cimis.incremental.method_settings import LEARNING_RATE_FACTOR
from cimis.model.modelfile import load_card
from cimis.story import evaluate_model

STEP = 1
VAL_CASES = 4  # two per scanner (validation cases alternate reference, other, ...)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", action="append", default=[], help="NAME=STRATEGY:KEY=VALUE,...")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--step-scanner", default="other", choices=["other", "reference"],
                        help="reference: the easy setting, every volume from one scanner")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [parse_variant(v) for v in args.variant]

    phantoms = PhantomData(**{**vars(QUICK_PHANTOMS), "cases": QUICK_PHANTOMS.cases + VAL_CASES - 1,
                              "val_cases": VAL_CASES,
                              "step_scanner": None if args.step_scanner == "reference" else args.step_scanner})
    config = replace(quick_config(["pseudo-labels"]), phantoms=phantoms, seeds=seeds)
    bench = prepare(config, Path(args.out), progress=False)
    if not args.report_only:
        for seed in seeds:
            for name, strategy, options in variants:
                run(bench, name, strategy, options, seed)
    report(bench, [v[0] for v in variants] or None, seeds)


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``NAME=STRATEGY:KEY=VALUE,...`` -> (name, strategy, options); a bare strategy names itself."""
    head, _, option_text = text.partition(":")
    name, _, strategy = head.partition("=")
    strategy = strategy or name
    options = {}
    for item in filter(None, option_text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, strategy, options


def run(bench, name: str, strategy: str, options: dict, seed: int) -> None:
    path = bench.out / "variants" / name / f"seed{seed}.json"
    if path.is_file():
        return
    base = train_unit(bench, Unit(BASE, 0, seed), progress=False)
    new = list(bench.schedule.steps[STEP])
    if strategy == BASE:
        write_record(bench, path, name, strategy, options, seed, base, new, 0.0)
        return
    data = _step_dataset(bench, STEP, new, "new-only")
    settings = {**bench.settings.of(strategy), **options}
    config = _step_config(bench.config, load_card(base), seed, bench.device, settings.get(LEARNING_RATE_FACTOR, 1.0))
    step_options = StepOptions.from_json({k: v for k, v in options.items() if k != LEARNING_RATE_FACTOR})
    run_dir = bench.out / "variant_runs" / name / f"seed{seed}"
    started = time.perf_counter()
    model = learn_step(base, data, run_dir, new, strategy, config, step_options, overwrite=True, progress=False,
                       method_settings=bench.settings)
    write_record(bench, path, name, strategy, options, seed, model, new, time.perf_counter() - started)


def write_record(bench, path: Path, name: str, strategy: str, options: dict, seed: int, model: Path, new: list,
                 seconds: float) -> None:
    cases = {c.case_id: c.dice for c in evaluate_model(model, bench.manifest, "val", "cpu").cases}
    record = {"name": name, "strategy": strategy, "options": options, "seed": seed, "seconds": seconds,
              "seconds_per_iteration": load_card(model).history[-1].get("seconds_per_iteration", float("nan")),
              "old": list(bench.schedule.step0), "new": new, "cases": cases,
              "scanner": {c: ("reference" if c in bench.manifest.splits.get("scanner_reference", cases) else "other")
                          for c in cases}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"{name} seed {seed} ({seconds:.0f} s): {summary(record)}", flush=True)


def group_mean(record: dict, classes: list[str], scanner: str | None = None) -> float:
    values = [d.get(c) for case, d in record["cases"].items() for c in classes
              if scanner is None or record["scanner"][case] == scanner]
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


COLUMNS = {
    "old": lambda r: group_mean(r, r["old"]),
    "old, ref. scanner": lambda r: group_mean(r, r["old"], "reference"),
    "old, other scanner": lambda r: group_mean(r, r["old"], "other"),
    "new": lambda r: group_mean(r, r["new"]),
    "new, other scanner": lambda r: group_mean(r, r["new"], "other"),
    "all": lambda r: group_mean(r, r["old"] + r["new"]),
    "s/it": lambda r: r["seconds_per_iteration"],
}


def summary(record: dict) -> str:
    return " ".join(f"{k} {f(record):.3f}" for k, f in COLUMNS.items())


def report(bench, names: list[str] | None, seeds: list[int]) -> None:
    folder = bench.out / "variants"
    names = names or sorted(p.name for p in folder.iterdir() if p.is_dir())
    lines = ["| variant | seeds | " + " | ".join(COLUMNS) + " |", "|:--" + "|--:" * (len(COLUMNS) + 1) + "|"]
    for name in names:
        records = [json.loads((folder / name / f"seed{s}.json").read_text()) for s in seeds
                   if (folder / name / f"seed{s}.json").is_file()]
        if not records:
            continue
        cells = []
        for f in COLUMNS.values():
            values = [f(r) for r in records]
            spread = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        lines.append(f"| {name} | {len(records)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (bench.out / "variants.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
