"""CUDA out of memory: what to try next (smaller batch, smaller patch, the CPU), the retry loop with a step
that really raises torch's OutOfMemoryError, and how each retry appears in the event stream."""

from __future__ import annotations

import io
import json

import pytest
import torch

from cimis.errors import CimisError
from cimis.jobs import Job
from cimis.worker import (
    Attempt,
    Cancellation,
    EventStream,
    JobCancelled,
    JobRun,
    is_cuda_oom,
    next_attempt_after_oom,
    run_with_oom_retries,
)

TRAIN_FIRST = Attempt("cuda:0", 4, (64, 64, 32))
DIVISOR = (8, 8, 8)


def sequence(first: Attempt, divisor) -> list[Attempt]:
    attempts, attempt = [first], first
    while (attempt := next_attempt_after_oom(attempt, first, divisor)) is not None:
        attempts.append(attempt)
    return attempts


def test_training_halves_the_batch_then_the_patch_then_uses_the_cpu():
    assert sequence(TRAIN_FIRST, DIVISOR) == [
        Attempt("cuda:0", 4, (64, 64, 32)),
        Attempt("cuda:0", 2, (64, 64, 32)),
        Attempt("cuda:0", 1, (64, 64, 32)),
        Attempt("cuda:0", 1, (32, 64, 32)),  # the largest axis first
        Attempt("cuda:0", 1, (32, 32, 32)),
        Attempt("cuda:0", 1, (32, 32, 16)),  # never below half the job's patch on any axis
        Attempt("cpu", 4, (64, 64, 32)),  # the CPU gets the job's own settings back
    ]


def test_the_patch_stays_a_multiple_of_the_network_stride():
    attempts = sequence(Attempt("cuda", 1, (48, 40, 24)), (16, 8, 8))
    patches = [a.patch_size for a in attempts if a.device == "cuda"]
    assert all(p % d == 0 for patch in patches for p, d in zip(patch, (16, 8, 8)))
    assert attempts[-1] == Attempt("cpu", 1, (48, 40, 24))


def test_a_model_whose_patch_cannot_change_goes_from_batch_to_cpu():
    assert sequence(Attempt("cuda", 2, (96, 96, 96)), None) == [
        Attempt("cuda", 2, (96, 96, 96)), Attempt("cuda", 1, (96, 96, 96)), Attempt("cpu", 2, (96, 96, 96)),
    ]
    assert next_attempt_after_oom(Attempt("cpu", 2, (96, 96, 96)), Attempt("cpu", 2, (96, 96, 96)), None) is None


class FailingStep:
    """A training step that runs out of GPU memory on its first ``failures`` calls (as torch reports it,
    possibly wrapped by a library), then succeeds."""

    def __init__(self, failures: int, wrap: bool = False):
        self.failures = failures
        self.wrap = wrap
        self.calls: list[Attempt] = []

    def __call__(self, attempt: Attempt) -> str:
        self.calls.append(attempt)
        if len(self.calls) <= self.failures:
            error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if not self.wrap:
                raise error
            try:
                raise error
            except torch.cuda.OutOfMemoryError as inner:
                raise RuntimeError("applying transform <RandCropByLabelClassesd>") from inner
        return f"trained on {attempt.device} with batch {attempt.batch_size}"


@pytest.mark.parametrize("wrap", [False, True])
def test_the_loop_retries_until_the_step_fits(wrap):
    step, retries, freed = FailingStep(3, wrap), [], []
    result = run_with_oom_retries(step, TRAIN_FIRST, DIVISOR, lambda a, b, e: retries.append((a, b, type(e).__name__)),
                                  lambda: freed.append(True))
    assert result == "trained on cuda:0 with batch 1"
    assert step.calls == sequence(TRAIN_FIRST, DIVISOR)[:4]
    assert [r[1] for r in retries] == step.calls[1:] and len(freed) == 3
    assert retries[0][2] == ("RuntimeError" if wrap else "OutOfMemoryError")


def test_the_loop_ends_on_the_cpu_and_gives_up_after_it():
    step = FailingStep(6)
    assert run_with_oom_retries(step, TRAIN_FIRST, DIVISOR, lambda *a: None) == "trained on cpu with batch 4"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_oom_retries(FailingStep(100), TRAIN_FIRST, DIVISOR, lambda *a: None)


def test_other_errors_and_cancellation_pass_through_untouched():
    def broken(attempt):
        raise ValueError("a bug")

    def cancelled(attempt):
        raise JobCancelled("SIGTERM")

    def out_of_ram(attempt):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(ValueError):
        run_with_oom_retries(broken, TRAIN_FIRST, DIVISOR, lambda *a: None)
    with pytest.raises(JobCancelled):
        run_with_oom_retries(cancelled, TRAIN_FIRST, DIVISOR, lambda *a: None)
    with pytest.raises(CimisError, match="ran out of memory"):
        run_with_oom_retries(out_of_ram, Attempt("cpu", 2, (32, 32, 32)), DIVISOR, lambda *a: None)
    assert is_cuda_oom(RuntimeError("CUDA error: out of memory")) and not is_cuda_oom(RuntimeError("shape mismatch"))


def test_each_retry_is_an_oom_event_and_the_cpu_fallback_a_warning(tmp_path):
    out = io.StringIO()
    events = EventStream(out)
    run = JobRun(Job(source=tmp_path / "job.json", kind="train", id="j", registry=tmp_path / "r", output=tmp_path / "o"),
                 events, Cancellation(events), resume=False)
    assert run_with_oom_retries(FailingStep(6), TRAIN_FIRST, DIVISOR, run.oom_retry) == "trained on cpu with batch 4"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    ooms = [e for e in lines if e["event"] == "oom"]
    assert [e["message"] for e in ooms] == [
        "the GPU ran out of memory; retrying with batch size 2",
        "the GPU ran out of memory; retrying with batch size 1",
        "the GPU ran out of memory; retrying with patch size 32x64x32",
        "the GPU ran out of memory; retrying with patch size 32x32x32",
        "the GPU ran out of memory; retrying with patch size 32x32x16",
        "the GPU ran out of memory; falling back to the CPU",
    ]
    assert ooms[-1]["failed"] == {"device": "cuda:0", "batch_size": 1, "patch_size": [32, 32, 16]}
    assert ooms[-1]["next"] == {"device": "cpu", "batch_size": 4, "patch_size": [64, 64, 32]}
    assert lines[-1]["event"] == "warning" and lines[-1]["code"] == "cpu_fallback"
    assert run.device == "cpu"
