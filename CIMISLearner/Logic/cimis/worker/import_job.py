"""The ``import`` job: a MONAI bundle or an nnU-Net v2 model (``cimis import-model``) becomes a new registry
version. The conversion is :func:`cimis.model.import_command.import_model`, run into the job's ``run/model``."""

from __future__ import annotations

from cimis.errors import CimisError
from cimis.registry import Registry, read_json_file
from cimis.worker.job_run import JobRun

# The import's stages in order (cimis.model.import_command.import_model's on_stage), for progress events.
_IMPORT_STAGES = ("reading", "converting", "prototypes", "saving")


def _registry_has_active_version(run: JobRun) -> bool:
    """Whether the job's registry exists with an active version; refuses a folder that is something else."""
    root = run.job.registry
    if (root / "registry.json").is_file():
        return Registry.open(root).active_version() is not None
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CimisError(f"{root} exists and is not a model registry", "choose an empty or new folder for the registry")
    return False


def run_import(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry, source=settings["source"])
    has_active = _registry_has_active_version(run)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    state = run.prepare(state)

    from cimis.model.import_command import import_model
    from cimis.model.monai_bundle import BundleOverrides

    device = run.resolve_device() if settings["volumes"] else "cpu"  # only the prototypes run the network
    run.work.clean_partial_saves()
    model_dir = run.work.finished_model()
    if model_dir is None:
        steps = [s for s in _IMPORT_STAGES if s != "prototypes" or settings["volumes"]]

        def on_stage(name: str) -> None:
            run.cancellation.check()
            run.stage(name)
            run.events.emit("progress", stage=name, iteration=steps.index(name), total=len(steps))

        overrides = BundleOverrides(spacing=settings["spacing"], window=settings["window"],
                                    patch_size=settings["patch_size"], classes=settings["classes"])
        model_dir, _ = import_model(settings["source"], run.work.run / "model", classes=settings["classes"],
                                    fold=settings["fold"], volumes=settings["volumes"] or None,
                                    overrides=overrides, device=device, on_stage=on_stage)
    run.begin_work()  # the imported model is complete: a cancel from here keeps it for --resume
    run.events.emit("progress", stage="saving", iteration=1, total=1)
    card = read_json_file(model_dir / "card.json", "the imported model's card")
    entry = card["history"][0]
    activate = settings["activate"] if settings["activate"] is not None else not has_active
    summary = {"kind": "import", "note": settings["note"] or f"imported from {settings['source'].name}",
               "source": str(settings["source"]), "source_kind": entry.get("source"),
               "builder": entry.get("builder"), "classes": entry.get("kept_classes", []),
               "job": {**job.to_json(), "token": state["token"]}}
    registry = run.publish(job.registry, model_dir, summary, activate, state["token"])
    result = run.result(version=run.published, active=registry.active_version() == run.published,
                        model=registry.versions_dir / run.published, classes=entry.get("kept_classes", []),
                        source=settings["source"], builder=entry.get("builder"), notes=entry.get("notes", []),
                        registry=registry.root, outputs=[])
    run.work.finish(result)
    return result
