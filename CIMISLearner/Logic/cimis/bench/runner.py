"""Runs a benchmark: every method through every step of the schedule, for every seed, resumably.

For each seed: the base model learns the step-0 classes with full labels (one unit, shared by every method);
then, step by step, each method learns the step's classes from label maps holding only them (as a clinician
paints them), starting from its own model of the previous step; ``joint`` instead trains from scratch on
every class seen so far with all of their labels. After every step the model segments the held-out test
split (sliding window, on each image's own grid) and is scored against the full reference labels.

Every unit ends in ``results/.../stepT.json`` (cimis/bench/results.py). A unit with a result is skipped; a
unit whose model exists is only evaluated; a unit interrupted during training resumes from its last
checkpoint. So running the same command again finishes an interrupted benchmark without recomputing
anything finished.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from cimis.bench.config import BenchConfig, check_output_folder, claim_output_folder, write_json_atomic
from cimis.bench.memory import PeakMemory
from cimis.bench.methods import Method, parse_methods
from cimis.bench.results import BASE, RESULT_FORMAT, Unit
from cimis.bench.schedule import Schedule, parse_schedule
from cimis.data.classes import ClassSet
from cimis.data.manifest import Manifest
from cimis.data.preprocess import PreprocessConfig
from cimis.device import resolve_device
from cimis.errors import CimisError
from cimis.incremental.learn import default_step_config, learn_step
from cimis.model.modelfile import load_card
from cimis.story import evaluate_model, new_only_dataset
from cimis.train import TrainConfig, train_model

TRAINING_RECORD = "training.json"
STEP_MANIFEST = "step.json"


@dataclass
class PreparedBench:
    """A benchmark ready to run: its configuration, data, schedule and device."""

    config: BenchConfig
    out: Path
    manifest: Manifest
    schedule: Schedule
    methods: list[Method]
    device: torch.device
    stored: dict  # bench.json
    settings: object = None  # MethodSettings

    def units(self) -> list[Unit]:
        """Every unit in running order: per seed, the base model, then step by step every method."""
        units = []
        for seed in self.config.seeds:
            units.append(Unit(BASE, 0, seed))
            for step in range(1, len(self.schedule.steps)):
                units += [Unit(m.name, step, seed) for m in self.methods]
        return units


def prepare(config: BenchConfig, out: Path, progress: bool = True) -> PreparedBench:
    """Check the configuration, load (or generate) the dataset and claim the output folder."""
    out = Path(out)
    device = resolve_device(config.device)
    if config.dataset == "phantoms":  # refuse a bad schedule before generating the phantoms
        from cimis.data.phantom import variant_classes

        parse_schedule(config.schedule, variant_classes(config.phantoms.variant), config.order)
    manifest = _load_dataset(config, out, progress)
    schedule = parse_schedule(config.schedule, manifest.classes, config.order)
    test_cases = manifest.cases_in("test") if "test" in manifest.splits else []
    if not any(c.label is not None for c in test_cases):
        raise CimisError(f"dataset {manifest.name!r} has no labelled case in its test split",
                         "a benchmark scores every step on held-out labelled cases: list some under splits.test")
    stored = config.to_json(device.type, _fingerprint(manifest))
    stored["schedule_steps"] = [list(s) for s in schedule.steps]
    claim_output_folder(out, stored)
    return PreparedBench(config, out, manifest, schedule, parse_methods(config.methods), device, stored,
                         config.settings())


def run_bench(bench: PreparedBench, progress: bool = True, units: list[Unit] | None = None) -> dict[str, int]:
    """Run every unit (of ``units``, default all, in running order) that has no result yet; returns how many
    were skipped and computed."""
    units = bench.units() if units is None else units
    todo = [u for u in units if not u.result_path(bench.out).is_file()]
    counts = {"finished before": len(units) - len(todo), "computed": 0}
    bar = tqdm(total=len(units), initial=counts["finished before"], desc="benchmark", unit="unit",
               disable=not progress)
    for unit in todo:
        bar.set_postfix_str(unit.key)
        if progress:
            bar.write(f"[{datetime.datetime.now():%H:%M:%S}] {unit.key}")
        _run_unit(bench, unit, progress)
        counts["computed"] += 1
        bar.update(1)
    bar.close()
    return counts


# ------------------------------------------------------------------------------------------- one unit
def train_unit(bench: PreparedBench, unit: Unit, progress: bool) -> Path:
    """Train the unit's model unless it exists (recording its cost); returns the model folder. No
    evaluation: tuning uses this for the base model without touching the test split."""
    run_dir = unit.run_dir(bench.out)
    model_dir = run_dir / "model"
    if not (model_dir / "card.json").is_file():
        with PeakMemory(bench.device) as peak:
            started = time.perf_counter()
            _train(bench, unit, run_dir, progress)
            seconds = time.perf_counter() - started
        write_json_atomic(run_dir / TRAINING_RECORD, {
            "peak_memory_mb": peak.mb, "memory_measure": peak.measure, "wall_seconds": seconds})
    return model_dir


def _run_unit(bench: PreparedBench, unit: Unit, progress: bool) -> None:
    run_dir = unit.run_dir(bench.out)
    model_dir = train_unit(bench, unit, progress)
    training = _training_record(run_dir, model_dir)

    started = time.perf_counter()
    predictions = run_dir / "predictions" if bench.config.save_predictions else None
    report = evaluate_model(model_dir, bench.manifest, "test", str(bench.device), predictions)
    card = load_card(model_dir)
    last = card.history[-1]
    result = {
        "format": RESULT_FORMAT,
        "method": unit.method, "step": unit.step, "seed": unit.seed,
        "strategy": last.get("strategy", "train"),
        "off": [] if unit.method == BASE else list(_method(bench, unit.method).off),
        "classes": card.classes.names, "new_classes": list(bench.schedule.steps[unit.step]),
        "dice": {k: _json_float(v) for k, v in report.mean_dice().items()},
        "evaluation": report.to_dict(),
        "model": str(model_dir.relative_to(bench.out)),
        "predictions": str(predictions.relative_to(bench.out)) if predictions else None,
        "iterations": last["config"]["iterations"],
        "seconds_per_iteration": last["seconds_per_iteration"],
        "training_wall_seconds": training["wall_seconds"],
        "peak_memory_mb": training["peak_memory_mb"],
        "memory_measure": training["memory_measure"],
        "evaluation_seconds": time.perf_counter() - started,
        "device": last.get("device"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = unit.result_path(bench.out)
    if path.exists():  # another process finished it meanwhile: keep the first result
        return
    write_json_atomic(path, result)


def _train(bench: PreparedBench, unit: Unit, run_dir: Path, progress: bool) -> None:
    """Train the unit's model into ``run_dir/model``, resuming from a checkpoint an interrupted run left."""
    cfg = bench.config
    resume = (run_dir / "checkpoint").is_dir()
    base_config = _base_config(cfg, unit.seed, bench.device)
    if unit.method == BASE:
        preprocess = PreprocessConfig(spacing=list(cfg.spacing), patch_size=list(cfg.patch))
        classes = ClassSet([bench.manifest.classes.by_name(n) for n in bench.schedule.step0])  # schedule order
        train_model(bench.manifest, run_dir, classes, cfg.network, preprocess, base_config, resume=resume,
                    progress=progress)
        return
    method = _method(bench, unit.method)
    base_model = Unit(BASE, 0, unit.seed).run_dir(bench.out) / "model"
    previous = base_model if unit.step == 1 else Unit(unit.method, unit.step - 1, unit.seed).run_dir(bench.out) / "model"
    new = list(bench.schedule.steps[unit.step])
    if method.strategy == "joint":
        # The upper bound trains from scratch on all classes seen so far: step 0's budget and labels of all.
        data = _step_dataset(bench, unit.step, bench.schedule.known_after(unit.step), "joint")
        config = base_config
    else:
        data = _step_dataset(bench, unit.step, new, "new-only")
        config = _step_config(cfg, load_card(base_model), unit.seed, bench.device,
                              bench.settings.learning_rate_factor(method.strategy))
    learn_step(previous, data, run_dir, new, method.strategy, config, method.options(), resume=resume,
               progress=progress, method_settings=bench.settings)


def _base_config(cfg: BenchConfig, seed: int, device: torch.device) -> TrainConfig:
    return TrainConfig(iterations=cfg.base_iterations, batch_size=cfg.batch_size, learning_rate=cfg.base_lr,
                       seed=seed, device=str(device), val_every=cfg.base_iterations,
                       checkpoint_every=max(cfg.base_iterations // 4, 1))


def _step_config(cfg: BenchConfig, base_card, seed: int, device: torch.device,
                 learning_rate_factor: float = 1.0) -> TrainConfig:
    """``cimis learn``'s default step budget (step 0's, at its reduced learning rate), with the overrides;
    the learning rate times the method's factor (method settings)."""
    config = default_step_config(base_card)
    iterations = cfg.step_iterations or config.iterations
    learning_rate = (cfg.step_lr or config.learning_rate) * learning_rate_factor
    return replace(config, iterations=iterations, learning_rate=learning_rate, seed=seed,
                   device=str(device), val_every=iterations, checkpoint_every=max(iterations // 4, 1))


def _training_record(run_dir: Path, model_dir: Path) -> dict:
    path = run_dir / TRAINING_RECORD
    if path.is_file():
        return json.loads(path.read_text())
    # The model was saved but the process stopped before its cost was written: the card has the trainer's
    # own (process-wide) figure.
    last = load_card(model_dir).history[-1]
    return {"peak_memory_mb": last.get("peak_memory_mb"), "wall_seconds": None,
            "memory_measure": "the trainer's process-wide peak (the per-unit measure was lost in an interruption)"}


def _method(bench: PreparedBench, name: str) -> Method:
    return next(m for m in bench.methods if m.name == name)


# --------------------------------------------------------------------------------------------- data
def _load_dataset(cfg: BenchConfig, out: Path, progress: bool) -> Manifest:
    if cfg.dataset == "phantoms":
        from cimis.data.phantom import write_phantom_dataset

        from cimis.data.phantom import SCANNERS

        folder = out / "data" / "phantoms"
        if not (folder / "manifest.json").is_file():  # written last: present means complete
            check_output_folder(out)  # before writing anything into it
            p = cfg.phantoms
            write_phantom_dataset(folder, p.cases, p.variant, (p.spacing,) * 3, p.seed, p.val_cases, p.test_cases,
                                  progress=progress,
                                  step_scanner=SCANNERS[p.step_scanner] if p.step_scanner else None)
        return Manifest.load(folder / "manifest.json")
    if cfg.dataset in ("btcv", "word"):
        from cimis.data.adapters import build_manifest

        return build_manifest(cfg.dataset, cfg.data_root)
    return Manifest.load(cfg.dataset)


def _fingerprint(manifest: Manifest) -> str:
    """A digest of the dataset's classes, cases and splits, with paths relative to the manifest's folder."""
    text = json.dumps(manifest.to_json(manifest.root), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_training_splits(manifest: Manifest, kind: str) -> tuple[str, ...]:
    """The splits a step trains on: ``train``, or in the hard phantom setting the steps' own scanner's
    cases (``train_steps``); ``joint`` learns from both."""
    from cimis.data.phantom import STEP_SPLIT

    if STEP_SPLIT not in manifest.splits:
        return ("train",)
    return ("train", STEP_SPLIT) if kind == "joint" else (STEP_SPLIT,)


def _step_dataset(bench: PreparedBench, step: int, kept: tuple[str, ...] | list[str], kind: str) -> Manifest:
    """Step ``step``'s training data: the training cases (:func:`step_training_splits`) and the val cases
    with only the ``kept`` classes labelled, leaving out the cases without a voxel of the step's new classes
    (nobody paints an absent organ)."""
    folder = bench.out / "data" / kind / f"step{step}"
    marker = folder / STEP_MANIFEST
    if marker.is_file():  # written last: present means complete
        return Manifest.load(marker)
    kept_classes = bench.manifest.classes.subset(kept)
    sources = step_training_splits(bench.manifest, kind)
    data = new_only_dataset(bench.manifest, kept_classes, folder, splits=(*sources, "val"))
    new_values = bench.manifest.classes.subset(bench.schedule.steps[step]).values
    splits = {"train": [c.id for s in sources for c in data.cases_in(s) if _has_any(c.label, new_values)],
              "val": [c.id for c in data.cases_in("val") if _has_any(c.label, new_values)]}
    if not splits["train"]:
        raise CimisError(f"no training case has a voxel of step {step}'s classes "
                         f"({', '.join(bench.schedule.steps[step])})", "check the dataset's labels")
    used = set(splits["train"]) | set(splits["val"])
    filtered = Manifest(data.name, data.classes, [c for c in data.cases if c.id in used], splits, data.root)
    filtered.save(marker, overwrite=True)
    return Manifest.load(marker)


def _has_any(label: Path, values: list[int]) -> bool:
    image = sitk.ReadImage(str(label))
    return bool(np.isin(sitk.GetArrayViewFromImage(image), values).any())


def _json_float(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None

