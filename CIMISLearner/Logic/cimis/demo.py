"""The demo: synthetic abdominal CTs -> train a small model on the CPU -> segment a held-out case -> Dice.

Runs in minutes on two CPU cores with no data to download. Every step is the real engine: phantoms are
written as NIfTI files with a manifest, read back through the dataset path, trained on with the MONAI
pipeline, segmented by sliding windows onto the input geometry and evaluated per class.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cimis.data.io import read_image
from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.evaluate import evaluate_folder
from cimis.figures import overlay_png
from cimis.infer import segment_file
from cimis.train import TrainConfig, train_model

MARKER = ".cimis-demo"

# Tuned so that the whole demo fits in about 8 minutes on 2 CPU cores (docs/benchmarks.md).
DEMO_CASES = 12  # 10 train, 1 validation, 1 held-out test
DEMO_SPACING = [4.0, 4.0, 4.0]
DEMO_PATCH = [64, 64, 48]
DEMO_ITERATIONS = 400


def prepare_output(out: Path, overwrite: bool) -> None:
    """Use ``out`` for the demo; replace an earlier demo there, never anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and not overwrite:
            raise CimisError(f"{out} exists and does not hold an earlier demo", "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by cimis demo; safe to delete\n")


def run_demo(out: Path, device: str = "auto", overwrite: bool = False, iterations: int = DEMO_ITERATIONS,
             cases: int = DEMO_CASES) -> float:
    """Run the demo into ``out``; prints the per-class table and returns the mean Dice on the test case."""
    started = time.perf_counter()
    prepare_output(out, overwrite)
    print(f"1/4 writing {cases} synthetic abdominal CT phantoms (13 BTCV organs, {DEMO_SPACING[0]:g} mm)")
    manifest_path = write_phantom_dataset(out / "phantoms", cases, "btcv", tuple(DEMO_SPACING), seed=0)
    manifest = Manifest.load(manifest_path)

    print(f"2/4 training a small 3D U-Net for {iterations} iterations on {len(manifest.cases_in('train'))} phantoms")
    preprocess = PreprocessConfig(spacing=DEMO_SPACING, patch_size=DEMO_PATCH)
    config = TrainConfig(iterations=iterations, batch_size=2, learning_rate=3e-3, device=device,
                         val_every=iterations, checkpoint_every=iterations)
    model = train_model(manifest, out / "run", network="small", preprocess=preprocess, config=config)

    print("3/4 segmenting the held-out phantom")
    (test_case,) = manifest.cases_in("test")
    prediction = out / "segmentation" / f"{test_case.id}.nii.gz"
    segment_file(model, test_case.image, prediction, device=device)

    print("4/4 evaluating")
    report = evaluate_folder(manifest_path, "test", out / "segmentation")
    report.write(out / "evaluation")
    image = read_image(test_case.image)
    overlay_png(image, {"reference": read_image(test_case.label), "prediction": read_image(prediction)},
                manifest.classes, out / "overlay.png", title=f"held-out phantom {test_case.id}")
    mean = report.overall_mean_dice()
    print(report.to_markdown())
    minutes = (time.perf_counter() - started) / 60
    print(f"mean Dice over {len(manifest.classes)} organs: {mean:.3f}   ({minutes:.1f} min)")
    print(f"model: {model}\nsegmentation: {prediction}\npicture: {out / 'overlay.png'}")
    return mean
