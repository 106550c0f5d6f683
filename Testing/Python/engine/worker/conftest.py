"""Shared pieces of the worker tests: tiny phantoms, job files, and the worker run as a real subprocess.

Tests reach the helpers below through the ``kit`` fixture (this module), since test modules are imported
by path (``--import-mode=importlib``) and cannot import a conftest by name.

Worker subprocesses run with one torch thread (``"threads": 1`` in their jobs): on a small shared machine,
torch's default of one thread per core can make every convolution many times slower when another process
competes for the cores.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.phantom import write_phantom_dataset

TINY_NETWORK = {"filters": [4, 8, 16], "kernel_sizes": [3, 3, 3], "strides": [1, 2, 2]}
TINY_PREPROCESS = {"spacing": [8.0, 8.0, 8.0], "patch_size": [32, 32, 16]}
BASE_CLASSES = ["spleen", "liver", "aorta", "left kidney"]
NEW_CLASSES = [{"name": "right kidney", "value": 2}, {"name": "stomach", "value": 7}]
EVENT_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def kit():
    """This module: job builders, the subprocess runner and the snapshot helpers."""
    return sys.modules[__name__]


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Three 8 mm phantoms (train, val, test) and, for the first two, label maps holding only the new
    classes (right kidney and stomach), as a clinician would paint them."""
    root = tmp_path_factory.mktemp("worker-data")
    write_phantom_dataset(root / "ds", num_cases=3, spacing=(8.0, 8.0, 8.0), seed=7, val_cases=1, test_cases=1,
                          progress=False)
    values = [c["value"] for c in NEW_CLASSES]
    for i in (0, 1):
        label = sitk.ReadImage(str(root / "ds" / "labelsTr" / f"phantom_00{i}.nii.gz"))
        array = sitk.GetArrayFromImage(label)
        new_only = sitk.GetImageFromArray(np.where(np.isin(array, values), array, 0).astype(np.uint8))
        new_only.CopyInformation(label)
        sitk.WriteImage(new_only, str(root / f"new_{i}.nii.gz"), True)
    return root


def image_of(dataset: Path, i: int) -> Path:
    return dataset / "ds" / "imagesTr" / f"phantom_00{i}.nii.gz"


# ------------------------------------------------------------------------------------------ jobs
def train_job(dataset: Path, registry: Path, output: Path, **extra) -> dict:
    job = {
        "format": "cimis-job/1", "kind": "train", "id": "base", "registry": str(registry), "output": str(output),
        "device": "auto", "threads": 1,
        "budget": {"iterations": 2, "batch_size": 2, "checkpoint_every": 1, "val_every": 2},
        "data": {"manifest": str(dataset / "ds" / "manifest.json"), "classes": BASE_CLASSES},
        "train": {"network": TINY_NETWORK, "preprocess": TINY_PREPROCESS, "note": "base model"},
    }
    job.update(extra)
    return job


def learn_job(dataset: Path, registry: Path, output: Path, iterations: int = 4, **extra) -> dict:
    job = {
        "format": "cimis-job/1", "kind": "learn", "id": "add-kidney", "registry": str(registry),
        "output": str(output), "device": "cpu", "threads": 1,
        "budget": {"iterations": iterations, "batch_size": 2, "checkpoint_every": 2, "val_every": iterations},
        "data": {"classes": copy.deepcopy(NEW_CLASSES), "cases": [
            {"image": str(image_of(dataset, 0)), "label": str(dataset / "new_0.nii.gz")},
            {"image": str(image_of(dataset, 1)), "label": str(dataset / "new_1.nii.gz"), "split": "val"},
        ]},
        "learn": {"learning_rate": 1e-4, "note": "right kidney and stomach"},
    }
    job.update(extra)
    return job


def segment_job(dataset: Path, registry: Path, output: Path, **extra) -> dict:
    job = {
        "format": "cimis-job/1", "kind": "segment", "id": "seg", "registry": str(registry), "output": str(output),
        "device": "cpu", "threads": 1,
        "data": {"images": [str(image_of(dataset, 2)), {"id": "second", "image": str(image_of(dataset, 1))}]},
    }
    job.update(extra)
    return job


def write_job(path: Path, job: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(job if isinstance(job, str) else json.dumps(job, indent=1))
    return path


# ------------------------------------------------------------------------------------ subprocess
def worker_command(job_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cimis.cli", "worker", str(job_file), *extra]


def worker_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CIMIS_WORKER_PAUSE_AT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class Worker:
    """``cimis worker`` as a real child process whose events are read line by line as they come."""

    def __init__(self, job_file: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
        self.proc = subprocess.Popen(worker_command(job_file, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env or worker_env(), cwd=cwd)
        self.events: list[dict] = []

    def next_event(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            return None
        event = json.loads(line)  # every stdout line must be one JSON object
        self.events.append(event)
        return event

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = EVENT_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next_event()
            if event is None:
                raise AssertionError(f"the worker ended before the awaited event; events: {self.events}\n"
                                     f"stderr: {self.proc.stderr.read()[-3000:]}")
            if predicate(event):
                return event
        raise AssertionError(f"no awaited event within {timeout} s; events: {self.events}")

    def finish(self, timeout: float = EVENT_TIMEOUT_S) -> tuple[int, list[dict], str]:
        while self.next_event() is not None:
            pass
        code = self.proc.wait(timeout=timeout)
        stderr = self.proc.stderr.read()
        return code, self.events, stderr

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()


def run_worker(job_file: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> tuple[int, list[dict], str]:
    """Run the worker to its end: exit status, events, stderr."""
    worker = Worker(job_file, *args, env=env, cwd=cwd)
    return worker.finish()


# ---------------------------------------------------------------------------------- the registry
def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's SHA-256 ("dir" for folders)."""
    if not root.exists():
        return {}
    snap = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        snap[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return snap


def copy_registry(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def base_run(dataset, tmp_path_factory):
    """A registry holding v0001, trained by a real worker train job: (registry, events, exit status, stderr)."""
    root = tmp_path_factory.mktemp("base-run")
    job_file = write_job(root / "train.json", train_job(dataset, root / "registry", root / "jobs" / "base"))
    code, events, stderr = run_worker(job_file)
    assert code == 0, stderr[-3000:]
    return root / "registry", events, code, stderr


@pytest.fixture(scope="session")
def learned_run(dataset, base_run, tmp_path_factory):
    """A copy of the base registry after a real learn job: (registry, events, exit status, stderr)."""
    root = tmp_path_factory.mktemp("learned-run")
    registry = copy_registry(base_run[0], root / "registry")
    job_file = write_job(root / "learn.json", learn_job(dataset, registry, root / "jobs" / "learn"))
    code, events, stderr = run_worker(job_file)
    assert code == 0, stderr[-3000:]
    return registry, events, code, stderr


@pytest.fixture
def base_registry(base_run, tmp_path) -> Path:
    """A private copy of the registry holding v0001 (active)."""
    return copy_registry(base_run[0], tmp_path / "registry")
