"""CUDA out of memory: :func:`next_attempt_after_oom` says what to try next (smaller batch, smaller patch, then
the CPU) and :func:`run_with_oom_retries` retries, reporting each change."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence, TypeVar

from cimis.errors import CimisError
from cimis.worker.cancellation import JobCancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Attempt:
    """What one try of a GPU step uses: the device, the batch (training patches or sliding windows) and
    the patch size."""

    device: str
    batch_size: int
    patch_size: tuple[int, int, int]

    def to_json(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "patch_size": list(self.patch_size)}


def next_attempt_after_oom(failed: Attempt, first: Attempt, patch_divisor: Sequence[int] | None) -> Attempt | None:
    """What to try after CUDA ran out of memory with ``failed`` (``first`` was the job's own setting).

    Halve the batch down to 1; then, when ``patch_divisor`` is given (the patch may change), halve the
    patch's largest axis while it stays a multiple of the divisor and at least half the original; then the
    CPU with the original batch and patch. None once the CPU has failed too (not a GPU problem).
    """
    if not failed.device.startswith("cuda"):
        return None
    if failed.batch_size > 1:
        return replace(failed, batch_size=max(1, failed.batch_size // 2))
    if patch_divisor is not None:
        order = sorted(range(3), key=lambda a: -failed.patch_size[a])
        for axis in order:
            size, step = failed.patch_size[axis], int(patch_divisor[axis])
            smaller = (size // 2) // step * step
            if smaller >= step and smaller * 2 >= first.patch_size[axis]:
                patch = list(failed.patch_size)
                patch[axis] = smaller
                return replace(failed, patch_size=tuple(patch))
    return replace(first, device="cpu")


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is CUDA running out of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        text = str(exc)
        if name == "OutOfMemoryError" or ("CUDA" in text and "out of memory" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_cpu_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text or "not enough memory" in text


def run_with_oom_retries(
    step: Callable[[Attempt], T],
    first: Attempt,
    patch_divisor: Sequence[int] | None,
    on_retry: Callable[[Attempt, Attempt, BaseException], None],
    free_memory: Callable[[], None] | None = None,
) -> T:
    """``step(attempt)``, retried after CUDA out-of-memory errors as :func:`next_attempt_after_oom` says.

    ``on_retry(failed, next, error)`` reports each change; ``free_memory`` runs before a retry.
    """
    attempt = first
    while True:
        try:
            return step(attempt)
        except BaseException as exc:
            if isinstance(exc, JobCancelled) or not is_cuda_oom(exc):
                if _is_cpu_oom(exc):
                    raise CimisError("the computer ran out of memory (RAM) for this job",
                                     "close other programs, or use a smaller batch size or patch size") from exc
                raise
            following = next_attempt_after_oom(attempt, first, patch_divisor)
            if following is None:
                raise
            on_retry(attempt, following, exc)
            del exc
            if free_memory is not None:
                free_memory()
            attempt = following


def free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
