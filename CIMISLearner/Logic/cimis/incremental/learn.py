"""One incremental step: previous model + a dataset labelled with only the new classes -> a new model.

``learn_step`` loads M_{t-1}, grows a copy of it by the new classes (the strategy says how), trains it
with the strategy's loss while M_{t-1} stays frozen, recomputes the global prototypes with the final model
and writes a model folder whose card extends the previous history.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cimis import distributed
from cimis.data.classes import ClassSet
from cimis.data.io import check_folder_output
from cimis.data.manifest import Manifest, check_labels_contain
from cimis.errors import CimisError
from cimis.incremental.base import StepOptions
from cimis.incremental.method_settings import MethodSettings, load_method_settings, resolve_options
from cimis.incremental.prototypes import carry_over_prototypes, global_prototypes
from cimis.incremental.strategies import DEFAULT_STRATEGY, STRATEGIES
from cimis.model.modelfile import ModelCard, check_model_output, load_model, load_prototypes, save_model
from cimis.model.network import SegmentationNet
from cimis.train import EventSink, TrainConfig

LEARNING_RATE_FACTOR = 1.0  # METHOD.md section 7 suggests a tenth; too slow to learn new organs (docs/method.md)


def resolve_new_classes(old: ClassSet, manifest: ClassSet, requested: list[str] | None) -> ClassSet:
    """The step's new classes: those named (from the manifest's list, or new names with free values), or by
    default every manifest class the model does not know. Refuses names the model already has."""
    old_names = {c.name.lower() for c in old}
    if requested:
        picked = []
        for name in requested:
            if name.lower() in old_names:
                raise CimisError(f"the model already has a class named {name!r}", "choose a new name")
            known = [c for c in manifest if c.name.lower() == name.lower()]
            if not known:
                raise CimisError(f"class {name!r} is not in the dataset's class list {manifest.names}",
                                 "add it to the manifest's classes with its label value")
            picked.append(known[0])
        new = ClassSet(picked)
    else:
        new = ClassSet([c for c in manifest if c.name.lower() not in old_names])
        if not len(new):
            raise CimisError("the dataset has no class the model does not already know",
                             "name the new classes, and label them in the dataset")
    clash = set(new.values) & set(old.values)
    if clash:
        raise CimisError(f"label values {sorted(clash)} of the new classes are already used by the model",
                         "give the new classes other label values")
    return new


def learn_step(
    previous_model: str | Path,
    manifest: Manifest,
    run_dir: str | Path,
    new_classes: list[str] | None = None,
    strategy: str = DEFAULT_STRATEGY,
    config: TrainConfig | None = None,
    options: StepOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventSink | None = None,
    progress: bool = True,
    method_settings: MethodSettings | None = None,
) -> Path:
    """Run one incremental step and write the new model to ``run_dir/model``.

    Args:
        previous_model: the model folder of M_{t-1}.
        manifest: the step's data; its labels carry only the new classes (other values are ignored).
        new_classes: names of the classes to learn (default: the manifest's classes the model lacks).
        strategy: one of :data:`~cimis.incremental.strategies.STRATEGIES`.
        config: budget; when None, step 0's settings (docs/method.md) at the method's learning-rate factor.
        options: loss weights and switches; the ones left None come from ``method_settings``.
        method_settings: per-method settings (default: the versioned ``method_settings.json``).
    """
    if strategy not in STRATEGIES:
        raise CimisError(f"unknown strategy {strategy!r}", f"choose one of {', '.join(STRATEGIES)}")
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if model_dir.resolve() == Path(previous_model).resolve():
        raise CimisError(f"{model_dir} is the model this step starts from; the step would replace it",
                         "choose another --out; the new model is a new folder")
    check_folder_output(run_dir, "run (--out)")
    check_model_output(model_dir, overwrite)  # refused now, not after training
    old_net, old_card = load_model(previous_model)
    old_prototypes = load_prototypes(previous_model, old_card)
    new = resolve_new_classes(old_card.classes, manifest.classes, new_classes)
    check_labels_contain(manifest.cases_in("train") + manifest.cases_in("val"), new)
    classes = old_card.classes.extended(new)
    settings = method_settings or load_method_settings()
    options = resolve_options(strategy, options or StepOptions(), settings)
    config = config or default_step_config(old_card, strategy, settings)
    cls = STRATEGIES[strategy]

    if getattr(cls, "fresh_start", False):
        torch.manual_seed(config.seed)
        student = SegmentationNet(old_card.network, classes.num_channels)
        label_classes = classes
    else:
        if options.head_init is None:
            raise CimisError(f"no head init for {strategy}", "set head_init in the method settings or pass --head-init")
        student = copy.deepcopy(old_net)
        torch.manual_seed(config.seed)  # the new channels' initial weights: the same on every rank and every run
        student.head.grow(len(new), init=options.head_init)
        label_classes = new
    trainer = cls(
        student, old_net=old_net, n_old=old_card.classes.num_channels, options=options, prototypes=old_prototypes,
        classes=classes, preprocess=old_card.preprocessing, config=config, run_dir=run_dir,
        on_event=on_event, progress=progress, label_classes=label_classes, method_settings=settings,
    )
    history = trainer.fit(manifest.cases_in("train"), manifest.cases_in("val"), manifest.classes, resume)

    # This rank's share of the training volumes: thresholds and prototypes are summed across ranks.
    volumes = getattr(trainer, "train_volumes", None) or trainer.model_space_volumes(
        distributed.share(manifest.cases_in("train")), manifest.classes)
    if not hasattr(trainer, "thresholds") or trainer.thresholds is None:
        trainer.thresholds = trainer.estimate_thresholds(volumes) if not getattr(cls, "fresh_start", False) else None
    targets_of = None if getattr(cls, "fresh_start", False) else trainer.final_targets()
    prototypes = global_prototypes(student, volumes, old_card.preprocessing.patch_size, trainer.device,
                                   targets_of, config.amp)
    # An imported model without prototypes got them from this step's images before training (pgcd-dapd).
    old_prototypes = old_prototypes if old_prototypes is not None else getattr(trainer, "old_prototypes", None)
    if old_prototypes is not None and not getattr(cls, "fresh_start", False):
        # An old organ absent from this step's data keeps the prototype it had (METHOD.md section 4 computes
        # prototypes over the step's voxels; an organ nobody scanned this time has none to offer).
        prototypes = carry_over_prototypes(prototypes, old_prototypes)
    entry = {
        "step": len(old_card.history), "kind": "learn", "strategy": strategy, "dataset": manifest.name,
        "new_classes": new.names, "config": asdict(config), "options": options.to_json(), "validation": history,
        "seconds_per_iteration": trainer.seconds_per_iteration, "peak_memory_mb": trainer.peak_memory_mb,
        "device": str(trainer.device),
        # PLOP's entropy thresholds the step's pseudo-labels and prototypes used (none for joint).
        "pseudo_label_thresholds": None if trainer.thresholds is None else [float(t) for t in trainer.thresholds],
    }
    card = ModelCard(classes=classes, network=old_card.network, preprocessing=old_card.preprocessing,
                     history=old_card.history + [entry], metrics={"validation": history[-1]} if history else {})
    if distributed.is_main():  # the others wait at the barrier
        save_model(model_dir, student, card, overwrite=True, prototypes=prototypes)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    distributed.barrier()
    return model_dir


def default_step_config(card: ModelCard, strategy: str | None = None,
                        settings: MethodSettings | None = None) -> TrainConfig:
    """Step 0's settings (from the model's history), its learning rate times LEARNING_RATE_FACTOR and, when
    ``strategy`` is given, times that method's learning-rate factor (method settings)."""
    base = next((h.get("config") for h in card.history if h.get("kind") == "train"), None)
    config = TrainConfig(**base) if base else TrainConfig()
    factor = LEARNING_RATE_FACTOR
    if strategy is not None:
        factor *= (settings or load_method_settings()).learning_rate_factor(strategy)
    return replace(config, learning_rate=config.learning_rate * factor)
