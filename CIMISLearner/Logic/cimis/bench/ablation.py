"""The ablation table of METHOD.md section 7: ``pgcd-dapd`` with every switch on, then with each one off.

The variants run through the ordinary benchmark (cimis/bench/methods.py names them, e.g.
``pgcd-dapd-no-spatial-weight``); this module turns their last-step figures into one table, with each
variant's change in mean Dice over all classes against the full method.
"""

from __future__ import annotations

from pathlib import Path

from cimis.bench.config import write_json_atomic
from cimis.bench.methods import inert_switches, parse_method
from cimis.bench.report import GROUP_TITLES, GROUPS, BenchReport, _cell, _csv
from cimis.data.io import csv_writer_atomic, write_text_atomic
from cimis.metrics import format_class_table

FULL_METHOD = "pgcd-dapd"
SWITCH_TITLES = {
    "pseudo_labels": "pseudo-labels",
    "spatial_weight": "PGCD spatial weight",
    "channel_weight": "PGCD channel weight",
    "output_term": "PGCD output term",
    "dapd_global": "DAPD global term",
    "dapd_local": "DAPD local term",
    "dynamic_background": "dynamic background prototype",
}


def variant_title(method: str) -> str:
    off = parse_method(method).off
    if not off:
        return f"{method} (all on)"
    return "without " + ", ".join(SWITCH_TITLES.get(s, s) for s in off)


def ablation_rows(report: BenchReport) -> dict[str, dict]:
    """Per variant, the last step's figures (mean, std, seeds) and the change of "all" against the full method."""
    t = report.last_step
    summary = report.summary()
    full = summary.get(FULL_METHOD, {}).get(t, {}).get("all", {}).get("mean")
    rows = {}
    for method in report.methods:
        row = {group: summary[method][t][group] for group in GROUPS}
        mean = row["all"]["mean"]
        row["delta_all"] = None if mean is None or full is None else mean - full
        rows[method] = row
    return rows


def _inert_note() -> str:
    inert = [SWITCH_TITLES[s] for s in inert_switches()]
    if not inert:
        return ""
    return (f"\nNot run: without {', '.join(inert)}. It weighs only the feature term L_f, which is off by default "
            "(lambda_f = 0, docs/method.md), so turning it off changes nothing.\n")


def write_ablation(report: BenchReport, out: Path) -> dict[str, Path]:
    """ablation.md, ablation.csv and ablation.json: one row per variant, the last step's figures."""
    out = Path(out)
    rows = ablation_rows(report)
    columns = [GROUP_TITLES[g] for g in GROUPS] + ["Δ all vs full"]
    table = {}
    for method, row in rows.items():
        cells = {GROUP_TITLES[g]: _cell(row[g]) for g in GROUPS}
        cells["Δ all vs full"] = None if row["delta_all"] is None else f"{row['delta_all']:+.3f}"
        table[variant_title(method)] = cells
    cfg = report.stored.get("identity", {})
    text = (f"# Ablation of {FULL_METHOD} (METHOD.md section 7): {cfg.get('dataset')}, schedule {cfg.get('schedule')}\n\n"
            f"Dice on the test split after the last step (step {report.last_step})"
            + (", mean ± sample std over seeds" if len(report.seeds) > 1 else f", seed {report.seeds[0]}")
            + "; each row turns one switch off.\n\n"
            + format_class_table(table, columns, "variant") + "\n" + _inert_note())
    paths = {"ablation_md": out / "ablation.md"}
    write_text_atomic(paths["ablation_md"], text, overwrite=True)
    paths["ablation_json"] = write_json_atomic(out / "ablation.json", {
        "step": report.last_step, "full_method": FULL_METHOD,
        "rows": {m: {**{g: {k: v for k, v in row[g].items() if k != "seeds"} for g in GROUPS},
                     "delta_all": row["delta_all"], "title": variant_title(m)} for m, row in rows.items()}})
    with csv_writer_atomic(out / "ablation.csv") as writer:
        writer.writerow(["method", "variant", *[f"{g}_mean" for g in GROUPS], *[f"{g}_std" for g in GROUPS], "delta_all"])
        for m, row in rows.items():
            writer.writerow([m, variant_title(m), *[_csv(row[g]["mean"]) for g in GROUPS],
                             *[_csv(row[g]["std"]) for g in GROUPS], _csv(row["delta_all"])])
    paths["ablation_csv"] = out / "ablation.csv"
    return paths
