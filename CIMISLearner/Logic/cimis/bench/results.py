"""Where a benchmark keeps its work, and the stored result of one (method, step, seed) unit.

Layout of the output folder::

    bench.json                          the configuration (cimis/bench/config.py)
    data/                               the dataset (phantoms) and each step's training labels
    runs/seed{S}/{method}/step{T}/      model/, predictions/, training.json (cost of the training)
    results/seed{S}/{method}/step{T}.json   one finished unit: evaluation on the test split and cost

Step 0 is one unit per seed, method ``base``, shared by every method (they all start from it). A result file
is written atomically once its unit is finished and is never rewritten: its presence is what makes a
rerun skip the unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cimis.errors import CimisError

BASE = "base"
RESULT_FORMAT = "cimis-bench-unit/1"


@dataclass(frozen=True)
class Unit:
    """One piece of benchmark work: ``method`` learning ``step`` of the schedule with ``seed``."""

    method: str
    step: int
    seed: int

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.method}/step{self.step}"

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.key

    def result_path(self, out: Path) -> Path:
        return out / "results" / f"{self.key}.json"


def unit_for(method: str, step: int, seed: int) -> Unit:
    """The unit holding ``method``'s model after ``step``: the shared base model at step 0."""
    return Unit(BASE if step == 0 else method, step, seed)


def read_result(path: Path) -> dict:
    """A stored unit result; refuses a file that is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CimisError(f"cannot read benchmark result {path}: {exc}",
                         "delete the file to recompute that unit") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise CimisError(f"{path} is not a {RESULT_FORMAT} result", "delete the file to recompute that unit")
    return data


def load_results(out: Path, units: list[Unit]) -> dict[Unit, dict]:
    """The finished units among ``units``."""
    return {u: read_result(u.result_path(out)) for u in units if u.result_path(out).is_file()}
