"""Peak memory of one piece of work: CUDA's max allocated on a GPU, the peak resident set size on a CPU.

Benchmark units run one after another in one process, so the process-wide high-water marks must be reset
before each unit: ``torch.cuda.reset_peak_memory_stats`` on a GPU; on Linux, writing ``5`` to
``/proc/self/clear_refs`` resets the resident-set high-water mark (``VmHWM``) to the current resident size.
Where that reset is impossible the measure is the process's peak since it started, and says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

CUDA_MEASURE = "CUDA max allocated (torch.cuda.max_memory_allocated), reset before each unit"
RSS_MEASURE = ("peak resident set size of the process (Linux VmHWM), reset before each unit; "
               "includes the process's baseline (Python, PyTorch, cached volumes)")
RSS_SINCE_START = "peak resident set size of the process since it started (getrusage); could not be reset per unit"

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb`` (MiB) and ``peak.measure`` (what it is)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")
        self.measure = CUDA_MEASURE if device.type == "cuda" else RSS_MEASURE

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_high_water_mark():
            self.measure = RSS_SINCE_START
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _rss_high_water_mark_mb()


def _reset_rss_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_high_water_mark_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
