"""The ``train`` job: a first model on the manifest's (or the chosen) classes, published as a new version."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cimis.errors import CimisError
from cimis.jobs import Job, check_training_data
from cimis.registry import Registry, classes_of, read_json_file
from cimis.worker.job_run import JobRun
from cimis.worker.oom import Attempt, free_cuda_memory, run_with_oom_retries
from cimis.worker.ranks import HelperRanks, check_ranks


def _check_registry_for_training(job: Job) -> Registry | None:
    """The job's registry if it exists; otherwise check that a train job may create it."""
    root = job.registry
    if (root / "registry.json").is_file():
        return Registry.open(root)
    if job.kind != "train":
        Registry.open(root)  # raises: learn and segment need a registry with a model
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CimisError(f"{root} exists and is not a model registry", "choose an empty or new folder for the registry")
    return None


def run_train(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    manifest = job.manifest
    classes = manifest.classes.subset(job.class_names) if job.class_names else manifest.classes
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    _check_registry_for_training(job)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    check_training_data(manifest, classes)
    check_ranks(job)
    state = run.prepare(state)

    device = run.resolve_device()
    preprocess, net_config, config = training_configs(job, device)
    iterations = config.iterations
    run.cancellation.check()
    run.begin_work()
    run.work.clean_partial_saves()

    model_dir = run.work.finished_model()
    if model_dir is None:
        run.stage("training", iterations=iterations)
        first = Attempt(device, config.batch_size, tuple(preprocess.patch_size))

        def train(attempt: Attempt) -> Path:
            return train_in_folder(job, attempt, run.work.checkpoint_exists(), run.trainer_event)

        if job.nproc > 1:  # the ranks split the batch: no out-of-memory retries (docs/worker-protocol.md)
            with HelperRanks(run, device, run.work.checkpoint_exists()):
                model_dir = train(first)
        else:
            model_dir = run_with_oom_retries(train, first, net_config.size_divisor, run.oom_retry, free_cuda_memory)
    card = read_json_file(model_dir / "card.json", "the trained model's card")
    summary = {
        "kind": "train", "note": settings.get("note", ""), "base_version": None, "dataset": manifest.name,
        "new_classes": classes.names, "iterations": iterations, "device": run.device,
        "metrics": card.get("metrics", {}), "job": {**job.to_json(), "token": state["token"]},
    }
    registry = run.publish(job.registry, model_dir, summary, settings.get("activate", True), state["token"])
    result = run.result(version=run.published, active=registry.active_version() == run.published,
                        model=registry.versions_dir / run.published, classes=classes_of(card).names,
                        metrics=card.get("metrics", {}), registry=registry.root, outputs=[])
    run.work.finish(result)
    return result


def training_configs(job: Job, device: str):
    """The job's (PreprocessConfig, NetworkConfig, TrainConfig) on ``device``; the same in every rank."""
    from cimis.data.preprocess import PreprocessConfig
    from cimis.model.network import NetworkConfig
    from cimis.train import TrainConfig

    settings = job.settings
    try:
        preprocess = PreprocessConfig.from_json(settings["preprocess"])
        network = settings["network"]
        net_config = (NetworkConfig.from_json(network) if isinstance(network, dict)
                      else NetworkConfig.preset(network, preprocess.patch_size, preprocess.spacing))
    except TypeError as exc:
        raise CimisError(f"job file {job.source}: malformed train.preprocess or train.network ({exc})") from None
    divisor = net_config.size_divisor
    if any(p % d for p, d in zip(preprocess.patch_size, divisor)):
        raise CimisError(f"patch size {preprocess.patch_size} is not a multiple of {divisor} per axis",
                         "choose a patch size divisible by the network's total stride")
    budget = job.budget
    iterations = budget.iterations or 1000
    config = TrainConfig(
        iterations=iterations, batch_size=budget.batch_size or 2, device=device,
        learning_rate=settings.get("learning_rate", 2e-3), seed=settings.get("seed", 0),
        augment=settings.get("augment", True), amp=settings.get("amp", True),
        val_every=budget.val_every or max(iterations // 4, 1),
        checkpoint_every=budget.checkpoint_every or max(iterations // 4, 1),
    )
    return preprocess, net_config, config


def train_in_folder(job: Job, attempt: Attempt, resume: bool, on_event=None) -> Path:
    """Train the job's model into ``OUTPUT/run`` (rank 0 and every helper rank run this)."""
    from cimis.train import train_model

    manifest = job.manifest
    classes = manifest.classes.subset(job.class_names) if job.class_names else manifest.classes
    preprocess, net_config, config = training_configs(job, attempt.device)
    return train_model(
        manifest, job.output / "run", classes, net_config,
        replace(preprocess, patch_size=list(attempt.patch_size)),
        replace(config, batch_size=attempt.batch_size,
                samples_per_volume=min(config.samples_per_volume, attempt.batch_size)),
        resume=resume, on_event=on_event, progress=False,
    )
