"""The ``segment`` job: label maps of the job's images by a registry version, written into the output folder."""

from __future__ import annotations

import time
from dataclasses import replace

from cimis.jobs import check_segment_inputs
from cimis.registry import Registry
from cimis.worker.job_run import JobRun
from cimis.worker.oom import Attempt, free_cuda_memory, run_with_oom_retries


def run_segment(run: JobRun) -> dict:
    job = run.job
    settings = job.settings
    run.stage("checking", kind=job.kind, output=job.output, registry=job.registry)
    registry = Registry.open(job.registry)
    state, previous = run.start_or_finished()
    if previous is not None:
        return previous
    version = state.get("version") or registry.resolve(settings["version"])
    state["version"] = version
    registry.verify(version)
    check_segment_inputs(job.images)
    targets = [run.work.labels / f"{item.id}.{settings['format']}" for item in job.images]
    state = run.prepare(state)

    from cimis.data.io import read_image, write_image
    from cimis.infer import segment_image
    from cimis.metrics import class_volumes_ml
    from cimis.train import peak_memory_mb

    import SimpleITK as sitk
    import torch

    device = run.resolve_device()
    net, card, _ = registry.load(version)
    run.cancellation.check()
    run.begin_work()
    run.stage("segmenting", version=version, images=len(job.images))
    divisor = card.network.size_divisor
    first = Attempt(device, 2, tuple(card.preprocessing.patch_size))
    attempt_box = {"attempt": first}
    outputs, started = [], time.monotonic()
    for index, (item, target) in enumerate(zip(job.images, targets)):
        if target.exists():  # written by an earlier, interrupted run of this job (writes are atomic)
            label = read_image(target)
            volumes = class_volumes_ml(sitk.GetArrayViewFromImage(label), label.GetSpacing()[::-1], card.classes)
        else:
            image = read_image(item.image)

            def segment(attempt: Attempt):
                attempt_box["attempt"] = attempt
                patched = replace(card, preprocessing=replace(card.preprocessing, patch_size=list(attempt.patch_size)))
                return segment_image(net, patched, image, device=attempt.device, sw_batch_size=attempt.batch_size,
                                     source=str(item.image))

            result = run_with_oom_retries(segment, attempt_box["attempt"], divisor, run.oom_retry, free_cuda_memory)
            write_image(result.label, target)
            volumes = result.volumes_ml
        done = index + 1
        elapsed = time.monotonic() - started
        outputs.append({"id": item.id, "image": item.image, "label": target, "volumes_ml": volumes})
        run.events.emit("progress", stage="segmenting", iteration=done, total=len(job.images), id=item.id,
                        label=target, eta_s=elapsed / done * (len(job.images) - done), device=run.device,
                        memory_mb=peak_memory_mb(torch.device(run.device)))
    run.cancellation.commit()
    result = run.result(version=version, classes=card.classes.names, outputs=outputs, registry=registry.root)
    run.work.finish(result)
    return result
