"""Data-parallel training across processes (``torchrun`` or ``cimis train/learn --nproc N``).

Every process (a *rank*) runs the same command on its own share of the data; DistributedDataParallel
averages the student's gradients, and the statistics that must be the same on every rank (pseudo-label
thresholds, prototypes, loss normalisers) are summed across ranks with the helpers here. In one process
every helper is a no-op, so the engine's code is the same with and without ``torchrun``.

The process group is initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the ranks train on GPUs, gloo on CPUs. docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cimis.errors import CimisError

# The collectives of one step wait this long for a slow rank (a long validation on rank 0) before failing.
TIMEOUT = datetime.timedelta(minutes=30)
# Fault-injection tests (docs/distributed.md): "RANK:ITERATION" makes that rank kill itself right after
# the checkpoint of that iteration, as a crashed machine would.
STOP_AT_ENV = "CIMIS_DISTRIBUTED_STOP_AT"
# The CUDA device index of this rank when it is not LOCAL_RANK (a worker job's "devices": [2, 3]).
GPU_ENV = "CIMIS_RANK_GPU"


# --------------------------------------------------------------------------------------- the group
def launched() -> bool:
    """Whether this process was started by torchrun (or ``--nproc``) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one that validates, writes checkpoints, events, progress bars and the model file."""
    return rank() == 0


def local_rank() -> int:
    """The CUDA device index of this rank: ``CIMIS_RANK_GPU`` when set, else ``LOCAL_RANK``."""
    return _gpu_index() if is_distributed() else 0


def _gpu_index() -> int:
    return int(os.environ.get(GPU_ENV, os.environ.get("LOCAL_RANK", "0")))


def wants_gpu(device: str) -> bool:
    """Whether a ``--device`` value means GPUs here (``auto`` with CUDA present, or ``cuda``)."""
    device = (device or "auto").lower()
    return torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Join the ranks torchrun started (NCCL on GPUs, gloo on CPUs) for the duration of a command;
    does nothing in a process that torchrun did not start as one of several."""
    if not launched() or is_distributed():
        yield
        return
    gpu = wants_gpu(device)
    if gpu:
        local = _gpu_index()
        if local >= torch.cuda.device_count():
            raise CimisError(f"process {local} on this machine has no GPU of its own "
                             f"({torch.cuda.device_count()} present)", "start at most one process per GPU")
        torch.cuda.set_device(local)
    try:
        dist.init_process_group("nccl" if gpu else "gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise CimisError(f"the training processes could not connect ({str(exc).splitlines()[0][:200]})",
                         "check MASTER_ADDR and MASTER_PORT, or choose a free port") from None
    try:
        yield
    finally:
        cleanup()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The GPU of this rank (``cuda:LOCAL_RANK``) when training on GPUs with several ranks."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait until every rank arrives (the others wait here while rank 0 validates or writes)."""
    if is_distributed():
        dist.barrier()


def share(items: Sequence) -> list:
    """This rank's part of ``items`` (every ``world_size``-th one from its rank): work that is summed
    across ranks afterwards (statistics over a whole dataset), done once in all."""
    return list(items)[rank()::world_size()]


# ------------------------------------------------------------------------------------- reductions
def _reduce_device(tensor: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only.
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else tensor.device


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank, in place (whatever device it is on); returns it. No gradient."""
    if not is_distributed():
        return tensor
    work = tensor.to(_reduce_device(tensor))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


class _GlobalSum(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient (torch.distributed.nn's, which is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over every rank, with gradient: its backward sums the ranks' gradients, so a loss
    computed from global sums, identical on every rank, gets under DDP's gradient averaging (a mean over
    ranks of ``world_size`` times the gradient) exactly the gradient it would have in one process with the
    whole global batch."""
    if not is_distributed():
        return tensor
    return _GlobalSum.apply(tensor)


def mean_over_ranks(value: float) -> float:
    """The mean of a number over every rank (the training loss for the log and the non-finite check)."""
    if not is_distributed():
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0]) / world_size()


@torch.no_grad()
def check_replicas_agree(tensors: Sequence[torch.Tensor], what: str, tolerance: float = 0.0) -> None:
    """Refuse to go on when the ranks hold different ``tensors`` (they must be replicas: the model's
    weights, the prototype bank, the pseudo-label thresholds), rather than train on silently diverged
    copies."""
    if not is_distributed() or not tensors:
        return
    # A fingerprint per tensor (sum, sum of squares, first and last value) rather than every weight: a few
    # numbers to reduce, computed where the tensor lives. Replicas give bit-identical fingerprints.
    prints = [torch.stack([v.sum(), (v * v).sum(), v[0], v[-1]]).cpu()
              for v in (t.detach().reshape(-1).double() for t in tensors if t.numel())]
    if not prints:
        return
    flat = torch.cat(prints)
    high, low = flat.clone(), flat.clone()
    for t, op in ((high, dist.ReduceOp.MAX), (low, dist.ReduceOp.MIN)):
        work = t.to(_reduce_device(t))
        dist.all_reduce(work, op=op)
        t.copy_(work)
    spread = float((high - low).abs().max()) if flat.numel() else 0.0
    if not spread <= tolerance:
        raise CimisError(f"the training processes hold different {what} (largest difference {spread:.3g})",
                         "report this as a bug; the last checkpoint is kept and --resume continues from it")


# ------------------------------------------------------------------------------------- the module
class WithFeatures(nn.Module):
    """``forward`` = ``net.forward_with_features``: DDP synchronises gradients only through ``forward``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_features(x)


def data_parallel(net: nn.Module, device: torch.device) -> nn.Module:
    """A module whose ``forward(x)`` returns ``(logits, features)`` of ``net``, wrapped in
    DistributedDataParallel when there are several ranks (``net`` is already on ``device``)."""
    module = WithFeatures(net)
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(net: nn.Module) -> nn.Module:
    """The network itself, without DDP or :class:`WithFeatures` around it: read ``num_channels``,
    ``config``, ``head`` and the weights to save from this."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(net, (DistributedDataParallel, WithFeatures)):
        net = net.module if isinstance(net, DistributedDataParallel) else net.net
    return net


# ---------------------------------------------------------------------------------------- faults
def stop_point(iteration: int) -> None:
    """For fault-injection tests: when ``CIMIS_DISTRIBUTED_STOP_AT`` is ``RANK:ITERATION`` and names this
    rank and iteration, the process kills itself (SIGKILL: no clean-up, as a crashed machine)."""
    wanted = os.environ.get(STOP_AT_ENV, "")
    if wanted and is_distributed() and wanted.strip() == f"{rank()}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
