"""The GPU check: measures the clinical targets of one GPU in one go (issue 15), no downloads.

It writes full-resolution phantoms (1.5 mm, the size of a cropped abdominal CT), trains a short base model
on the old organs, and then records:

- time and peak GPU memory to learn one new organ (the aorta) from 5 annotated CTs with ``pgcd-dapd`` at the
  clinical default budget (step 0's settings, ``--step-iterations`` iterations);
- time and peak GPU memory to segment a 512 x 512 x 200 CT with the learned model;
- the ``pgcd-dapd`` / ``ft`` seconds-per-iteration ratio, measured in the same process;
- all of the above per-iteration figures with mixed precision on and off.

Targets (issue 15): learn <= 10 min, segment <= 5 s, training <= 12 GB of GPU memory. Every phase checks the
time left before it starts (``--budget-s``) and is reported as "not measured" when it would not fit, so the
script ends in time on a slower card.

    python Testing/Benchmarks/gpu_check.py --out gpu_check            # on a GPU machine (Testing/Benchmarks/gpu_check.sh)
    python Testing/Benchmarks/gpu_check.py --out /tmp/gc --smoke      # tiny sizes on the CPU: checks the script runs

It writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.incremental.learn import default_step_config, learn_step
from cimis.infer import segment_image
from cimis.model.modelfile import load_card, load_model
from cimis.train import TrainConfig, train_model

OLD = ["spleen", "right kidney", "left kidney", "liver", "stomach", "pancreas"]
NEW = ["aorta"]
TARGETS = {"learn_s": 600.0, "segment_s": 5.0, "train_peak_gb": 12.0}


@dataclass
class Sizes:
    """What one run of the check uses; ``--smoke`` shrinks everything so the CPU can run it in seconds."""

    spacing: list
    patch: list
    network: str
    cases: int
    base_iterations: int
    step_iterations: int
    ratio_iterations: int
    segment_size: tuple  # x, y, z voxels of the CT that is segmented

    @staticmethod
    def full() -> "Sizes":
        # 5 training cases for the step + 1 validation + 1 test.
        return Sizes([1.5, 1.5, 2.0], [96, 96, 96], "dynunet", 7, 300, 1000, 60, (512, 512, 200))

    @staticmethod
    def smoke() -> "Sizes":
        return Sizes([6.0, 6.0, 6.0], [32, 32, 32], "small", 7, 4, 4, 3, (64, 64, 40))


class Clock:
    """Wall-clock budget of the whole check."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _step(base: Path, manifest: Manifest, out: Path, strategy: str, iterations: int, amp: bool,
          device: torch.device) -> dict:
    """One incremental step; returns its wall time, seconds per iteration and peak GPU memory."""
    config = replace(default_step_config(load_card(base)), iterations=iterations, device=str(device), amp=amp,
                     val_every=iterations, checkpoint_every=iterations)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    model = learn_step(base, manifest, out, NEW, strategy, config, overwrite=True, progress=False)
    _sync(device)
    entry = load_card(model).history[-1]
    return {"model": str(model), "seconds": time.perf_counter() - start,
            "seconds_per_iteration": entry["seconds_per_iteration"], "peak_gb": _peak_gb(device)}


def _large_ct(manifest: Manifest, size: tuple) -> sitk.Image:
    """The test phantom resampled onto a ``size`` grid covering the same extent (a CT of clinical size)."""
    image = sitk.ReadImage(str(manifest.cases_in("test")[0].image))
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    reference = sitk.Image([int(s) for s in size], image.GetPixelID())
    reference.SetSpacing([float(e / s) for e, s in zip(extent, size)])
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0)


def _segment(model: Path, image: sitk.Image, amp: bool, device: torch.device) -> dict:
    net, card = load_model(model)
    segment_image(net, card, image, device=device, amp=amp)  # warm-up: cuDNN autotuning, allocator
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    segment_image(net, card, image, device=device, amp=amp)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "peak_gb": _peak_gb(device)}


def run_check(out: Path, sizes: Sizes, budget_s: float, device: torch.device) -> dict:
    clock = Clock(budget_s)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__, "sizes": sizes.__dict__, "targets": TARGETS, "phases": {},
    }
    phases = report["phases"]

    def phase(name: str, needs_s: float, fn):
        if clock.left() < needs_s:
            phases[name] = {"skipped": f"not measured: {clock.left():.0f} s left, needs about {needs_s:.0f} s"}
            return None
        start = time.perf_counter()
        phases[name] = fn()
        phases[name]["phase_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {phases[name]}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        return phases[name]

    manifest_path = write_phantom_dataset(out / "phantoms", sizes.cases, spacing=sizes.spacing, progress=False)
    manifest = Manifest.load(manifest_path)
    base_run = out / "base"
    phase("base", 0, lambda: _train_base(manifest, base_run, sizes, device))
    base = base_run / "model"
    learned = phase("learn_pgcd_dapd_amp", 60, lambda: _step(
        base, manifest, out / "step_pgcd_dapd", "pgcd-dapd", sizes.step_iterations, True, device))
    for strategy in ("pgcd-dapd", "ft"):
        for amp in (True, False):
            name = f"ratio_{strategy}_{'amp' if amp else 'fp32'}"
            phase(name, 30, lambda s=strategy, a=amp: _step(
                base, manifest, out / f"ratio_{s}_{a}", s, sizes.ratio_iterations, a, device))
    model = Path(learned["model"]) if learned else base
    ct = _large_ct(manifest, sizes.segment_size)
    for amp in (True, False):
        phase(f"segment_{'amp' if amp else 'fp32'}", 20, lambda a=amp: _segment(model, ct, a, device))
    for precision in ("amp", "fp32"):
        p, f = phases.get(f"ratio_pgcd-dapd_{precision}", {}), phases.get(f"ratio_ft_{precision}", {})
        if "seconds_per_iteration" in p and "seconds_per_iteration" in f:
            report[f"pgcd_dapd_over_ft_{precision}"] = p["seconds_per_iteration"] / f["seconds_per_iteration"]
    report["total_seconds"] = round(budget_s - clock.left(), 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def _train_base(manifest: Manifest, run: Path, sizes: Sizes, device: torch.device) -> dict:
    classes = manifest.classes.subset(OLD)
    config = TrainConfig(iterations=sizes.base_iterations, device=str(device), val_every=sizes.base_iterations,
                         checkpoint_every=sizes.base_iterations)
    _reset_peak(device)
    start = time.perf_counter()
    model = train_model(manifest, run, classes, sizes.network, PreprocessConfig(spacing=sizes.spacing,
                        patch_size=sizes.patch), config, overwrite=True, progress=False)
    entry = load_card(model).history[-1]
    return {"seconds": time.perf_counter() - start, "seconds_per_iteration": entry["seconds_per_iteration"],
            "peak_gb": _peak_gb(device)}


def markdown(report: dict) -> str:
    """The check's figures as a table against the targets."""

    def cell(phase: str, key: str, fmt: str = "{:.2f}") -> str:
        value = report["phases"].get(phase, {}).get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else report["phases"].get(phase, {}).get(
            "skipped", "n/a")

    sizes = report["sizes"]
    rows = [
        ("learn 1 new organ from 5 CTs, pgcd-dapd, AMP", f"{sizes['step_iterations']} it",
         cell("learn_pgcd_dapd_amp", "seconds", "{:.0f} s"), f"<= {TARGETS['learn_s']:.0f} s"),
        ("  peak GPU memory", "", cell("learn_pgcd_dapd_amp", "peak_gb", "{:.1f} GiB"),
         f"<= {TARGETS['train_peak_gb']:.0f} GB"),
        ("segment a {}x{}x{} CT, AMP".format(*sizes["segment_size"]), "",
         cell("segment_amp", "seconds", "{:.1f} s"), f"<= {TARGETS['segment_s']:.0f} s"),
        ("  peak GPU memory", "", cell("segment_amp", "peak_gb", "{:.1f} GiB"), ""),
        ("segment, full precision", "", cell("segment_fp32", "seconds", "{:.1f} s"), ""),
    ]
    for strategy in ("pgcd-dapd", "ft"):
        for precision in ("amp", "fp32"):
            rows.append((f"{strategy} s/iteration, {precision}", f"{sizes['ratio_iterations']} it",
                         cell(f"ratio_{strategy}_{precision}", "seconds_per_iteration", "{:.3f} s"), ""))
    for precision in ("amp", "fp32"):
        ratio = report.get(f"pgcd_dapd_over_ft_{precision}")
        rows.append((f"pgcd-dapd / ft iteration time, {precision}", "",
                     f"{ratio:.2f}x" if ratio else "n/a", "<= 1.25x"))
    lines = [f"GPU check on {report['device']} (torch {report['torch']}), {report.get('total_seconds')} s in all",
             "", "| measure | budget | figure | target |", "| --- | --- | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole check")
    parser.add_argument("--step-iterations", type=int, help="the learn step's budget (default 1000, step 0's default)")
    args = parser.parse_args(argv)
    sizes = Sizes.smoke() if args.smoke else Sizes.full()
    if args.step_iterations:
        sizes.step_iterations = args.step_iterations
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("error: no GPU found; the GPU check needs one (use --smoke to check the script on a CPU)")
    print(markdown(run_check(args.out, sizes, args.budget_s, device)))


if __name__ == "__main__":
    main()
