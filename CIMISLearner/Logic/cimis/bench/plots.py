"""The report's two pictures: mean Dice after each step per method, and per-class Dice after the last step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cimis.bench.report import GROUP_TITLES, BenchReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _value(stat: dict) -> tuple[float, float]:
    mean = np.nan if stat["mean"] is None else stat["mean"]
    std = 0.0 if stat["std"] is None else stat["std"]
    return mean, std


def _error_bars(values: list[tuple[float, float]]) -> list[float] | None:
    """The standard deviations, or None with a single seed (no spread to show)."""
    return [v[1] for v in values] if any(v[1] for v in values) else None


def mean_dice_per_step_png(report: BenchReport, path: Path) -> Path:
    """Three panels (step-0 classes, later classes, all classes): a line per method over the steps, with
    the standard deviation over seeds as error bars."""
    plt = _pyplot()
    summary = report.summary()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, group in zip(axes, ("step0", "later", "all")):
        steps = [t for t in report.steps if not (group == "later" and t == 0)]
        for method in report.methods:
            values = [_value(summary[method][t][group]) for t in steps]
            ax.errorbar(steps, [v[0] for v in values], yerr=_error_bars(values), marker="o", capsize=3,
                        label=method)
        ax.set_title(f"{GROUP_TITLES[group]}")
        ax.set_xlabel("step")
        ax.set_xticks(list(report.steps))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (test split)")
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Mean Dice after each step, schedule {report.stored.get('identity', {}).get('schedule')}")
    fig.tight_layout()
    return _save(fig, plt, path)


def last_step_per_class_png(report: BenchReport, path: Path) -> Path:
    """Grouped bars: for every class, each method's Dice after the last step (classes of step 0 first)."""
    plt = _pyplot()
    per_class = report.per_class()
    t = report.last_step
    classes = list(report.schedule.known_after(t))
    width = 0.8 / max(len(report.methods), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.25 * len(classes) * len(report.methods))), 4.8))
    x = np.arange(len(classes))
    for i, method in enumerate(report.methods):
        values = [_value(per_class[method][t][c]) for c in classes]
        ax.bar(x + (i - (len(report.methods) - 1) / 2) * width, [v[0] for v in values], width,
               yerr=_error_bars(values), label=method, capsize=2)
    boundary = len(report.schedule.step0) - 0.5
    ax.axvline(boundary, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (test split)")
    ax.set_title(f"Per-class Dice after the last step (step {t}); left of the dashed line: step-0 classes")
    ax.legend(fontsize=8, ncol=min(len(report.methods), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(report: BenchReport, out: Path) -> dict[str, Path]:
    return {"mean_dice_png": mean_dice_per_step_png(report, Path(out) / "mean_dice_per_step.png"),
            "per_class_png": last_step_per_class_png(report, Path(out) / "last_step_per_class.png")}
