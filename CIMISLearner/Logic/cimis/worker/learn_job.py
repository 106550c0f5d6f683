"""The ``learn`` job: one incremental step from a registry version, scored against it, published as a new
version."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cimis.errors import CimisError
from cimis.jobs import check_training_data, resolve_new_classes
from cimis.registry import Registry, classes_of, read_json_file
from cimis.worker.job_run import JobRun
from cimis.worker.oom import Attempt, free_cuda_memory, run_with_oom_retries
from cimis.worker.ranks import HelperRanks, check_ranks


def run_learn(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    manifest = job.manifest
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    registry = Registry.open(job.registry)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    base = state.get("base_version") or registry.resolve(settings["base_version"])
    state["base_version"] = base
    old_card = registry.verify(base)
    new = resolve_new_classes(job, classes_of(old_card, f"version {base}"))
    check_training_data(manifest, new)
    check_ranks(job)
    state = run.prepare(state)

    from cimis.model.modelfile import load_card

    device = run.resolve_device()
    base_dir = registry.versions_dir / base
    strategy, options, config = step_settings(job, base_dir, device)
    run.cancellation.check()
    run.begin_work()
    run.work.clean_partial_saves()

    model_dir = run.work.finished_model()
    first = Attempt(device, config.batch_size, tuple(load_card(base_dir).preprocessing.patch_size))
    if model_dir is None:
        run.stage("training", iterations=config.iterations, base_version=base, new_classes=new.names)

        def learn(attempt: Attempt) -> Path:
            return learn_in_folder(job, base_dir, new.names, attempt, run.work.checkpoint_exists(), run.trainer_event)

        if job.nproc > 1:  # the ranks split the batch: no out-of-memory retries (docs/worker-protocol.md)
            with HelperRanks(run, device, run.work.checkpoint_exists(), base_version=base):
                model_dir = learn(first)
        else:
            model_dir = run_with_oom_retries(learn, first, None, run.oom_retry, free_cuda_memory)
    check = _check_new_version(run, base_dir, model_dir, new, first)
    card = read_json_file(model_dir / "card.json", "the new model's card")
    summary = {
        "kind": "learn", "note": settings.get("note", ""), "base_version": base, "dataset": manifest.name,
        "strategy": strategy, "new_classes": new.names, "iterations": config.iterations, "device": run.device,
        "metrics": card.get("metrics", {}), "check": check, "job": {**job.to_json(), "token": state["token"]},
    }
    registry = run.publish(job.registry, model_dir, summary, settings.get("activate", True), state["token"])
    result = run.result(version=run.published, active=registry.active_version() == run.published,
                        base_version=base, model=registry.versions_dir / run.published,
                        classes=classes_of(card).names, new_classes=new.names, check=check,
                        metrics=card.get("metrics", {}), registry=registry.root, outputs=[])
    run.work.finish(result)
    return result


def step_settings(job, base_dir: Path, device: str):
    """The job's (strategy, StepOptions, StepConfig) on ``device`` from the base version's card; the same in
    every rank."""
    from cimis.incremental.base import StepOptions
    from cimis.incremental.learn import default_step_config
    from cimis.incremental.strategies import STRATEGIES
    from cimis.model.modelfile import load_card

    settings = job.settings
    strategy = settings["strategy"]
    if strategy not in STRATEGIES:
        raise CimisError(f"job file {job.source}: unknown strategy {strategy!r} in learn.strategy",
                         f"choose one of {', '.join(STRATEGIES)}")
    try:
        options = StepOptions.from_json(settings["options"])
    except CimisError as exc:
        raise CimisError(f"job file {job.source}: learn.options: {exc.message}", exc.hint) from None
    except TypeError as exc:
        raise CimisError(f"job file {job.source}: malformed learn.options ({exc})") from None
    config = default_step_config(load_card(base_dir))
    budget = job.budget
    overrides = {k: v for k, v in {
        "iterations": budget.iterations, "batch_size": budget.batch_size,
        "learning_rate": settings.get("learning_rate"), "seed": settings.get("seed"),
        "augment": settings.get("augment"), "amp": settings.get("amp"),
    }.items() if v is not None}
    config = replace(config, device=device, **overrides)
    config = replace(config, val_every=budget.val_every or max(config.iterations // 4, 1),
                     checkpoint_every=budget.checkpoint_every or max(config.iterations // 4, 1))
    return strategy, options, config


def learn_in_folder(job, base_dir: Path, new_names: list[str], attempt: Attempt, resume: bool, on_event=None) -> Path:
    """One incremental step into ``OUTPUT/run`` (rank 0 and every helper rank run this)."""
    from cimis.incremental.learn import learn_step

    strategy, options, config = step_settings(job, base_dir, attempt.device)
    # The patch size belongs to the model (its card), so only the batch and the device may change.
    return learn_step(
        base_dir, job.manifest, job.output / "run", new_names, strategy,
        replace(config, batch_size=attempt.batch_size,
                samples_per_volume=min(config.samples_per_volume, attempt.batch_size)),
        options, resume=resume, on_event=on_event, progress=False,
    )


def _check_new_version(run: JobRun, base_dir: Path, model_dir: Path, new, first: Attempt) -> dict:
    """Score the new version before it is published (cimis.version_check): Dice of the new organs on the
    volumes marked for validation, old and new versions' agreement on every old organ."""
    from cimis.infer import segment_image
    from cimis.version_check import score_new_version

    manifest = run.job.manifest
    run.stage("scoring", volumes=len(manifest.cases_in("train") + manifest.cases_in("val")))
    attempt_box = {"attempt": replace(first, batch_size=2)}

    def segment(net, card, image):
        def one(attempt: Attempt):
            attempt_box["attempt"] = attempt
            return segment_image(net.to(attempt.device), card, image, device=attempt.device,
                                 sw_batch_size=attempt.batch_size).label

        import SimpleITK as sitk

        label = run_with_oom_retries(one, attempt_box["attempt"], None, run.oom_retry, free_cuda_memory)
        return sitk.GetArrayFromImage(label)

    check = score_new_version(base_dir, model_dir, manifest, new, run.device, segment, run.cancellation.check)
    run.events.emit("check", **check)
    return check
