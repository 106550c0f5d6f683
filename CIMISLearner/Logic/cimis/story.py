"""The incremental story end to end: a base model on some organs, one step that learns the others from
new-only labels with several strategies, and a comparison on held-out data with full labels.

Used by the demo (phantoms) and by the real-CT run (``cimis story``); the benchmark harness generalises it
to whole schedules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassSet
from cimis.data.io import read_image, write_image, write_text_atomic
from cimis.data.manifest import Case, Manifest, load_case
from cimis.data.preprocess import PreprocessConfig
from cimis.evaluate import compare_label_maps
from cimis.figures import overlay_png
from cimis.incremental.learn import learn_step
from cimis.infer import segment_image
from cimis.metrics import EvaluationReport, format_class_table
from cimis.model.modelfile import load_model
from cimis.model.network import NetworkConfig
from cimis.train import TrainConfig, train_model


def new_only_dataset(manifest: Manifest, new: ClassSet, out_dir: Path, splits=("train", "val")) -> Manifest:
    """Copies of the label maps of ``splits`` that keep only the ``new`` classes: the data of a step, as a
    clinician who paints only the new organs produces it. Images are referenced, not copied."""
    out_dir = Path(out_dir)
    keep = np.zeros(max(manifest.classes.values + new.values) + 1, dtype=bool)
    keep[new.values] = True
    cases, kept_splits = [], {}
    for split in splits:
        kept_splits[split] = []
        for case in manifest.cases_in(split):
            image, label = load_case(case, manifest.classes)
            values = sitk.GetArrayFromImage(label)
            only_new = sitk.GetImageFromArray(np.where(keep[values], values, 0).astype(values.dtype))
            only_new.CopyInformation(image)
            path = write_image(only_new, out_dir / "labels" / f"{case.id}.nii.gz", overwrite=True)
            if case.id not in {c.id for c in cases}:
                cases.append(Case(case.id, case.image, path))
            kept_splits[split].append(case.id)
    step = Manifest(f"{manifest.name} (new classes only: {', '.join(new.names)})", new, cases, kept_splits, out_dir)
    step.save(out_dir / "manifest.json", overwrite=True)
    return step


def evaluate_model(model_dir: Path, manifest: Manifest, split: str, device: str, predictions: Path | None = None) -> EvaluationReport:
    """Segment every case of ``split`` and score it against its full reference, on the model's classes."""
    net, card = load_model(model_dir)
    results = []
    for case in manifest.cases_in(split):
        image, reference = load_case(case, manifest.classes)
        prediction = segment_image(net, card, image, device=device, source=str(case.image)).label
        if predictions is not None:
            write_image(prediction, predictions / f"{case.id}.nii.gz", overwrite=True)
        results.append(compare_label_maps(prediction, reference, card.classes, case.id, hd95=False))
    return EvaluationReport(card.classes, results)


@dataclass
class StoryResult:
    """Mean Dice per model over the old, the new and all classes, and per class."""

    old: list[str]
    new: list[str]
    reports: dict[str, EvaluationReport] = field(default_factory=dict)
    seconds_per_iteration: dict[str, float] = field(default_factory=dict)
    evaluated_on: str = "held-out data"

    def summary(self) -> dict[str, dict[str, float]]:
        rows = {}
        for name, report in self.reports.items():
            dice = report.mean_dice()
            rows[name] = {
                f"old ({len(self.old)})": _mean(dice, self.old),
                f"new ({len(self.new)})": _mean(dice, self.new),
                "all": _mean(dice, self.old + self.new),
            }
        return rows

    def per_class(self) -> dict[str, dict[str, float]]:
        return {c: {m: r.mean_dice().get(c, float("nan")) for m, r in self.reports.items()} for c in self.old + self.new}

    def to_markdown(self) -> str:
        summary = self.summary()
        columns = list(next(iter(summary.values())))
        text = f"Mean Dice on {self.evaluated_on} (n/a: the model does not have that class)\n\n"
        text += format_class_table(summary, columns, first_column="model") + "\n\n"
        text += format_class_table(self.per_class(), list(self.reports), first_column="class")
        return text

    def write(self, out: Path) -> None:
        """Write story.md and story.json into the story's own folder (atomically, replacing an earlier run's)."""
        write_text_atomic(out / "story.md", self.to_markdown() + "\n", overwrite=True)
        data = {"old": self.old, "new": self.new, "summary": self.summary(), "per_class": self.per_class(),
                "seconds_per_iteration": self.seconds_per_iteration}
        write_text_atomic(out / "story.json", json.dumps(data, indent=2, default=_json_number) + "\n", overwrite=True)


def _mean(dice: dict[str, float], names: list[str]) -> float:
    values = [dice[n] for n in names if n in dice and np.isfinite(dice[n])]
    return float(np.mean(values)) if values else float("nan")


def _json_number(x):
    return None if isinstance(x, float) and not np.isfinite(x) else x


def single_pass_config(iterations: int, learning_rate: float, device: str) -> TrainConfig:
    """A story's training run: batch 2, validated and checkpointed once, at the end."""
    return TrainConfig(iterations=iterations, batch_size=2, learning_rate=learning_rate, device=device,
                       val_every=iterations, checkpoint_every=iterations)


def run_story(
    manifest_path: Path,
    out: Path,
    old_names: list[str],
    new_names: list[str],
    preprocess: PreprocessConfig,
    network: str | NetworkConfig,
    base_config: TrainConfig,
    step_config: TrainConfig,
    strategies: tuple[str, ...] = ("ft", "pgcd-dapd"),
    joint: bool = True,
    eval_split: str = "test",
    progress: bool = True,
    on_joint=lambda report: None,
) -> StoryResult:
    """Base model on ``old_names``; one step per strategy learning ``new_names`` from new-only labels;
    optionally the joint upper bound first (all classes at once, base budget; ``on_joint(report)`` sees its
    evaluation); everything evaluated on ``eval_split`` with full labels. Writes models, predictions, story.md/json and overlay.png to ``out``."""
    manifest = Manifest.load(manifest_path)
    old, new = manifest.classes.subset(old_names), manifest.classes.subset(new_names)
    device = base_config.device
    evaluated_on = "held-out data" if eval_split == "test" else f"the {eval_split!r} split"
    result = StoryResult(old.names, new.names, evaluated_on=evaluated_on)
    say = print if progress else (lambda *a, **k: None)

    if joint:
        say(f"joint upper bound: all {len(old) + len(new)} organs with every label at once")
        model = train_model(manifest, out / "joint", manifest.classes.subset(old.names + new.names), network,
                            preprocess, base_config, overwrite=True, progress=progress)
        result.reports["joint"] = evaluate_model(model, manifest, eval_split, device, out / "joint" / "predictions")
        on_joint(result.reports["joint"])

    say(f"base model: {len(old)} organs ({', '.join(old.names)})")
    base = train_model(manifest, out / "base", old, network, preprocess, base_config, overwrite=True, progress=progress)
    result.reports["base"] = evaluate_model(base, manifest, eval_split, device)

    step_data = new_only_dataset(manifest, new, out / "step_data")
    for strategy in strategies:
        say(f"step with {strategy}: learn {len(new)} organs ({', '.join(new.names)}) from new-only labels")
        model = learn_step(base, step_data, out / strategy, new.names, strategy, step_config, overwrite=True, progress=progress)
        result.reports[strategy] = evaluate_model(model, manifest, eval_split, device, out / strategy / "predictions")
        result.seconds_per_iteration[strategy] = load_model(model)[1].history[-1]["seconds_per_iteration"]

    result.write(out)
    case = manifest.cases_in(eval_split)[0]
    image, reference = load_case(case, manifest.classes)
    shown = {"reference": reference}
    for strategy in strategies:
        shown[strategy] = read_image(out / strategy / "predictions" / f"{case.id}.nii.gz")
    overlay_png(image, shown, manifest.classes, out / "overlay.png",
                title=f"{case.id}: old organs ({len(old)}) + new organs ({len(new)}) after one step")
    return result
