"""What a benchmark run is: dataset, schedule, class order, methods, seeds, network and budgets.

The configuration is stored as ``bench.json`` in the output folder. Everything that changes a unit's
result (the "identity": data, schedule, network, budgets, device type) must match when the folder is used
again, so a finished result is never mixed with results of another setting; the methods and seeds are a
selection and may grow between runs (more seeds, another method), each (method, step, seed) unit being
computed once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cimis.bench.methods import DEFAULT_METHODS, parse_methods
from cimis.data import io as data_io
from cimis.errors import CimisError

FORMAT = "cimis-bench/1"
CONFIG_NAME = "bench.json"
BUILTIN_DATASETS = ("phantoms", "btcv", "word")


@dataclass
class PhantomData:
    """Seeded synthetic CTs (cimis.data.phantom) generated into the output folder."""

    variant: str = "btcv"
    cases: int = 12
    spacing: float = 4.0
    seed: int = 0
    val_cases: int = 1
    test_cases: int = 2
    # The hard setting: the steps' training volumes come from this scanner (cimis.data.phantom.SCANNERS),
    # step 0's from the reference one; None: every volume from the reference scanner.
    step_scanner: str | None = None

    def __post_init__(self):
        from cimis.data.phantom import SCANNERS

        if self.step_scanner is not None and self.step_scanner not in SCANNERS:
            raise CimisError(f"unknown phantom scanner {self.step_scanner!r}", f"use one of {', '.join(SCANNERS)}")


@dataclass
class BenchConfig:
    """One benchmark: a dataset and schedule, the methods and seeds, the network and the training budgets.

    Attributes:
        dataset: ``phantoms``, ``btcv``, ``word`` (read from ``data_root`` by the adapters) or a manifest path.
        schedule: "N-M" or an explicit grouping (cimis/bench/schedule.py).
        order: the class order of an "N-M" schedule: ``dataset``, ``seed:K`` or a list of names.
        base_iterations, base_lr: step 0's budget; also that of ``joint``, which trains from scratch.
        step_iterations, step_lr: each later step's budget; None takes step 0's iterations and
            ``cimis learn``'s default learning rate (step 0's).
    """

    dataset: str = "phantoms"
    data_root: str | None = None
    phantoms: PhantomData = field(default_factory=PhantomData)
    schedule: str = "7-3"
    order: str = "dataset"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    network: str = "small"
    spacing: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0])
    patch: list[int] = field(default_factory=lambda: [64, 64, 48])
    batch_size: int = 2
    base_iterations: int = 400
    base_lr: float = 3e-3
    step_iterations: int | None = None
    step_lr: float | None = None
    device: str = "auto"
    save_predictions: bool = True
    method_settings: str | None = None  # per-method settings file; None: the versioned one

    def __post_init__(self):
        if isinstance(self.phantoms, dict):
            self.phantoms = PhantomData(**self.phantoms)
        parse_methods(self.methods)
        if not self.seeds:
            raise CimisError("no seed to run", "give at least one seed, e.g. --seeds 0")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise CimisError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        for name, value in (("base iterations", self.base_iterations), ("step iterations", self.step_iterations),
                            ("batch size", self.batch_size)):
            if value is not None and value < 1:
                raise CimisError(f"{name} must be at least 1, got {value}")
        for name, value in (("base learning rate", self.base_lr), ("step learning rate", self.step_lr)):
            if value is not None and value <= 0:
                raise CimisError(f"the {name} must be positive, got {value}")
        if self.dataset in ("btcv", "word") and not self.data_root:
            raise CimisError(f"dataset {self.dataset} needs the folder it is in", "pass --data-root DIR")
        if self.dataset not in BUILTIN_DATASETS and not Path(self.dataset).is_file():
            raise CimisError(f"dataset {self.dataset!r} is neither one of {', '.join(BUILTIN_DATASETS)} nor a "
                             "manifest file", "give phantoms, btcv, word or the path of a manifest JSON")

    def identity(self) -> dict:
        """The settings every stored result depends on (everything except the selection: methods, seeds,
        and whether predictions are kept)."""
        data = asdict(self)
        for selection in ("methods", "seeds", "save_predictions"):
            data.pop(selection)
        # The settings themselves, not the file's name: results depend on the values.
        data["method_settings"] = self.settings().values
        if self.dataset != "phantoms":
            data.pop("phantoms")
        elif data["phantoms"]["step_scanner"] is None:  # as before scanners existed
            data["phantoms"].pop("step_scanner")
        if self.dataset not in ("btcv", "word"):
            data.pop("data_root")
        if self.dataset not in BUILTIN_DATASETS:
            data["dataset"] = str(Path(self.dataset).resolve())
        return data

    def settings(self):
        """The per-method settings every unit of this benchmark uses."""
        from cimis.incremental.method_settings import load_method_settings

        return load_method_settings(self.method_settings)

    def to_json(self, device_type: str, dataset_fingerprint: str) -> dict:
        identity = self.identity()
        identity["device"] = device_type  # auto resolves differently per machine; what ran is what counts
        identity["dataset_fingerprint"] = dataset_fingerprint
        return {"format": FORMAT, "identity": identity, "methods": list(self.methods), "seeds": list(self.seeds),
                "save_predictions": self.save_predictions}


def claim_output_folder(out: Path, stored: dict) -> None:
    """Use ``out`` for this benchmark: a new or empty folder, or one holding the same benchmark identity.

    Refuses a folder holding anything else, or a benchmark of another identity, naming what differs.
    """
    path = out / CONFIG_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CimisError(f"cannot read {path}: {exc}", "choose another --out") from None
        if not isinstance(previous, dict) or previous.get("format") != FORMAT:
            raise CimisError(f"{path} is not a {FORMAT} benchmark configuration", "choose another --out")
        old, new = previous.get("identity", {}), stored["identity"]
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differing:
            raise CimisError(
                f"{out} holds a benchmark with a different configuration (differs in: {', '.join(differing)})",
                "choose another --out, or repeat the earlier settings to resume it")
    else:
        check_output_folder(out)
    write_json_atomic(path, stored)


def check_output_folder(out: Path) -> None:
    """Refuse a folder holding something other than a benchmark (or the data of one that was interrupted
    before it stored its configuration)."""
    if (out / CONFIG_NAME).is_file() or not out.exists():
        return
    if not out.is_dir():
        raise CimisError(f"{out} is a file", "give a folder for --out")
    data = out / "data"
    if any(e.name not in ("data", "shards") for e in out.iterdir()) or (data.is_dir() and any(e.name != "phantoms" for e in data.iterdir())):
        raise CimisError(f"{out} exists and does not hold a benchmark", "choose a new or empty --out folder")


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON so that ``path`` holds either the old or the complete new content, never a torn file
    (the engine's shared helper, replacing what is there: a benchmark folder is the benchmark's own)."""
    return data_io.write_json_atomic(path, data, overwrite=True)
