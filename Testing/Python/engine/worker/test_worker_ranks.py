"""A worker job on several ranks (``"nproc": 2`` on the CPU, gloo), the worker as a real subprocess: one event
stream with one terminal event, one published version, a cancel that ends every rank and leaves a resumable
checkpoint, a rank that dies reported as one error event with nothing published, and bad ``nproc``/``devices`` refused with one error event and nothing written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cimis.registry import Registry


def assert_one_stream(events: list[dict], job_id: str) -> None:
    """seq counts up from 1 (one writer), started first, exactly one terminal event, last."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["protocol"] == 1 and (e["job"] == job_id or i == 0) for i, e in enumerate(events))
    assert events[0]["event"] == "started"
    terminal = [e for e in events if e["event"] in ("done", "error", "cancelled")]
    assert len(terminal) == 1 and terminal[0] is events[-1]


def helper_ranks_of(job_file: Path) -> list[int]:
    """Process ids of helper ranks (``cimis.worker.rank``) still running for ``job_file``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cimis.worker.rank" in command and str(job_file).encode() in command:
                found.append(int(entry.name))
    return found


def test_a_two_rank_train_job_publishes_one_version_through_one_stream(kit, dataset, tmp_path):
    registry = tmp_path / "registry"
    job_file = kit.write_job(tmp_path / "train.json",
                             kit.train_job(dataset, registry, tmp_path / "jobs" / "base", nproc=2))
    code, events, stderr = kit.run_worker(job_file)
    assert code == 0, stderr[-3000:]
    assert_one_stream(events, "base")
    device = next(e for e in events if e["event"] == "device")
    assert device["device"] == "cpu" and device["nproc"] == 2
    # Rank 0 alone reports: each iteration, checkpoint and validation once.
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [1, 2]
    assert [e["iteration"] for e in events if e["event"] == "checkpoint"] == [1]
    assert len([e for e in events if e["event"] == "metric"]) == 1
    done = events[-1]
    assert done["event"] == "done" and done["version"] == "v0001"
    reg = Registry.open(registry)
    assert reg.version_names() == ["v0001"]
    net, card, prototypes = reg.load("v0001")
    assert prototypes is not None and set(card.classes.names) == set(kit.BASE_CLASSES)
    assert reg.summary("v0001")["job"]["nproc"] == 2
    assert not helper_ranks_of(job_file)
    assert "Traceback" not in stderr


def test_cancel_ends_every_rank_and_resume_finishes_the_job(kit, dataset, base_registry, tmp_path):
    before = kit.tree_snapshot(base_registry)
    job = kit.learn_job(dataset, base_registry, tmp_path / "out", iterations=400, nproc=2)
    job["budget"].update(checkpoint_every=1, val_every=400)
    job_file = kit.write_job(tmp_path / "learn.json", job)
    worker = kit.Worker(job_file)
    worker.wait_for(lambda e: e["event"] == "checkpoint")
    assert helper_ranks_of(job_file)  # rank 1 runs beside the worker
    (tmp_path / "out" / "cancel").touch()
    started = time.monotonic()
    code, events, stderr = worker.finish(timeout=30)
    assert code == 143, stderr[-3000:]
    assert time.monotonic() - started < 10
    assert_one_stream(events, "add-kidney")
    assert events[-1]["event"] == "cancelled" and events[-1]["resumable"] is True
    assert "from the last checkpoint" in events[-1]["message"]
    deadline = time.monotonic() + 10
    while helper_ranks_of(job_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not helper_ranks_of(job_file)
    assert kit.tree_snapshot(base_registry) == before  # nothing published

    # --resume continues the checkpoint (here with two ranks again) and publishes once.
    saved = int(next(e["iteration"] for e in reversed(events) if e["event"] == "checkpoint"))
    job["budget"].update(iterations=saved + 2, val_every=saved + 2)
    kit.write_job(job_file, job)
    code, events, stderr = kit.run_worker(job_file, "--resume")
    assert code == 0, stderr[-3000:]
    assert_one_stream(events, "add-kidney")
    progress = [e["iteration"] for e in events if e["event"] == "progress"]
    assert progress[0] > 1 and progress[-1] == saved + 2  # continued, not restarted
    assert Registry.open(base_registry).version_names() == ["v0001", "v0002"]


def test_a_rank_that_dies_is_one_error_event_and_nothing_published(kit, dataset, tmp_path):
    registry = tmp_path / "registry"
    job = kit.train_job(dataset, registry, tmp_path / "out", nproc=2)
    job["budget"].update(iterations=4, val_every=4)
    job_file = kit.write_job(tmp_path / "train.json", job)
    # Rank 1 kills itself (SIGKILL) right after the checkpoint of iteration 1, as a crashed process would.
    code, events, stderr = kit.run_worker(job_file, env=kit.worker_env(CIMIS_DISTRIBUTED_STOP_AT="1:1"))
    assert code == 2, stderr[-3000:]
    assert_one_stream(events, "base")
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "user", error
    assert error["message"] == "training process 1 of 2 was killed by SIGKILL; the others were stopped"
    assert "--resume" in error["hint"]
    assert not (registry / "versions").exists() or not any((registry / "versions").iterdir())
    assert (tmp_path / "out" / "run" / "checkpoint" / "state.json").is_file()
    assert not helper_ranks_of(job_file)


BAD = {
    "more processes than cores": ({"nproc": 999}, "asks for more processes than the", "'nproc'"),
    "devices on a machine without a GPU": ({"devices": [0, 1], "device": "auto"}, "no CUDA GPU is present", "'nproc'"),
    "devices with device cpu": ({"devices": [0, 1]}, "'devices' lists GPUs, and 'device' is 'cpu'", "'nproc'"),
    "nproc and devices disagree": ({"nproc": 3, "devices": [0, 1], "device": "auto"}, "'nproc' is 3", "give one"),
    "batch that does not split": ({"nproc": 2, "budget": {"iterations": 2, "batch_size": 3}},
                                  "budget.batch_size 3 does not split evenly over 2 processes", "multiple of 2"),
    "nproc with one GPU named": ({"nproc": 2, "device": "cuda:1"}, "'device' is 'cuda:1'", "'devices'"),
    "nproc zero": ({"nproc": 0}, "'nproc' must be a positive integer", None),
    "nproc in a segment job": (None, "'nproc' is for train and learn jobs", "leave 'nproc' out"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_nproc_or_devices_is_one_error_event_and_nothing_written(kit, dataset, base_registry, tmp_path, case):
    extra, words, hint = BAD[case]
    if extra is None:
        job = kit.segment_job(dataset, base_registry, tmp_path / "out", nproc=2)
    else:
        job = kit.learn_job(dataset, base_registry, tmp_path / "out", **extra)
    job_file = kit.write_job(tmp_path / "job.json", job)
    before = kit.tree_snapshot(tmp_path)
    code, events, stderr = kit.run_worker(job_file)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert_one_stream(events, events[-1]["job"])
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "user", error
    assert words in error["message"], error
    if hint:
        assert hint in (error["hint"] or ""), error
    assert kit.tree_snapshot(tmp_path) == before
