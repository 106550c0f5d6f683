"""The ready-made benchmarks: ``--quick`` (phantoms on two CPU cores) and ``--full`` (real CT on a GPU).

``--quick`` was sized so that BTCV 7-3 with the seven methods before ``pseudo-labels`` and one seed
finishes within 30 minutes on two CPU cores (docs/benchmarks.md has the measured time; the eighth method
adds its two steps). ``--full`` runs METHOD.md section 9's schedules on
BTCV and WORD with nnU-Net's DynUNet at its usual spacing and patch, three seeds.
"""

from __future__ import annotations

from cimis.bench.config import BenchConfig, PhantomData
from cimis.bench.methods import DEFAULT_METHODS

# METHOD.md section 9.
SCHEDULES = {"btcv": ("7-6", "7-3", "7-2", "9-1", "4-3"), "word": ("8-8", "8-4", "8-2", "12-1")}
ABLATION_SCHEDULE = {"btcv": "7-3", "word": "8-4"}
# --quick --ablation: eight variants of pgcd-dapd; one step (7-6) keeps it near the main --quick's time.
QUICK_ABLATION_SCHEDULE = "7-6"

# --quick, measured on CPU-2 (docs/benchmarks.md): 4 mm phantoms, the small UNet on 48x48x32 patches.
QUICK_PHANTOMS = PhantomData(variant="btcv", cases=13, spacing=4.0, seed=0, val_cases=1, test_cases=2)
QUICK_PATCH = [48, 48, 32]
QUICK_BASE_ITERATIONS = 400
QUICK_STEP_ITERATIONS = 120
QUICK_BASE_LR = 3e-3

# --full: step 0 as nnU-Net trains a first model; every later step with the same number of iterations.
FULL_BASE_ITERATIONS = 5000
FULL_SEEDS = [0, 1, 2]


def quick_config(methods: list[str] | None = None, ablation: bool = False) -> BenchConfig:
    return BenchConfig(
        dataset="phantoms", phantoms=PhantomData(**vars(QUICK_PHANTOMS)),
        schedule=QUICK_ABLATION_SCHEDULE if ablation else "7-3", order="dataset",
        methods=list(methods or DEFAULT_METHODS), seeds=[0], network="small",
        spacing=[QUICK_PHANTOMS.spacing] * 3, patch=list(QUICK_PATCH), batch_size=2,
        base_iterations=QUICK_BASE_ITERATIONS, base_lr=QUICK_BASE_LR, step_iterations=QUICK_STEP_ITERATIONS,
        step_lr=None, device="cpu",
    )


def full_config(dataset: str, data_root: str, schedule: str, methods: list[str] | None = None) -> BenchConfig:
    return BenchConfig(
        dataset=dataset, data_root=data_root, schedule=schedule, order="dataset",
        methods=list(methods or DEFAULT_METHODS), seeds=list(FULL_SEEDS), network="dynunet",
        spacing=[1.5, 1.5, 2.0], patch=[96, 96, 96], batch_size=2, base_iterations=FULL_BASE_ITERATIONS,
        base_lr=2e-3, step_iterations=None, step_lr=None, device="cuda",
    )
