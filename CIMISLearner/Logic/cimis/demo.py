"""The demo: synthetic abdominal CTs, then the whole incremental story on two CPU cores.

1. Phantoms: 12 synthetic CTs with the 13 BTCV organs (10 train, 1 validation, 1 held out).
2. Joint: a small 3D U-Net learns all 13 organs with full labels and segments the held-out phantom; its
   per-class Dice table is printed (the foundation's check: mean Dice >= 0.80).
3. Base: the same network on 7 organs only.
4. One incremental step learns the other 6 organs from labels that carry only them, with ``ft`` (plain
   fine-tuning) and ``pgcd-dapd`` (our method).
5. A table of Dice on old, new and all organs for base, ft, pgcd-dapd and joint, and a picture.

Every step is the real engine: NIfTI files and a manifest, the MONAI pipeline, sliding-window inference
onto the input geometry, per-class evaluation. ``--segmentation-only`` stops after step 2.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cimis.data.classes import BTCV_ORGANS
from cimis.data.io import read_image
from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.errors import CimisError
from cimis.figures import overlay_png
from cimis.story import evaluate_model, run_story, single_pass_config
from cimis.train import train_model

MARKER = ".cimis-demo"

# Sized for two CPU cores (docs/benchmarks.md has the timings).
DEMO_CASES = 12
DEMO_SPACING = [4.0, 4.0, 4.0]
DEMO_PATCH = [64, 64, 48]
SEGMENTATION_ITERATIONS = 500  # --segmentation-only: all 13 organs, the foundation's check
BASE_ITERATIONS = 400  # the story's joint and base models
STEP_ITERATIONS = 200
# The step-0 organs: the large ones and the aorta; the step adds the small and tubular ones.
OLD_ORGANS = ["spleen", "right kidney", "left kidney", "liver", "stomach", "aorta", "inferior vena cava"]
NEW_ORGANS = [o for o in BTCV_ORGANS if o not in OLD_ORGANS]


# What the demo writes at the top of its folder; anything else there is the user's.
DEMO_ENTRIES = (MARKER, "phantoms", "joint", "story", "segmentation.png")


def prepare_output(out: Path, overwrite: bool, command: str = "demo", marker: str = MARKER,
                   entries: tuple[str, ...] = DEMO_ENTRIES) -> None:
    """Use ``out`` for ``cimis COMMAND``'s output: a new or empty folder, or (with ``overwrite``) a folder an
    earlier run of the same command wrote, carrying ``marker`` and holding nothing but ``entries``.

    Anything else is refused before a file is touched: a folder without the marker, a file a user added to
    an earlier run's folder, an earlier run without ``--overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise CimisError(f"{out} is a file", "give --out a folder")
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if present:
        if marker not in present:
            raise CimisError(f"{out} exists and does not hold an earlier {command}'s output",
                             "choose another --out (a new or empty folder)")
        foreign = [name for name in present if name not in entries and not _staging_leftover(name)]
        if foreign:
            raise CimisError(f"{out} holds an earlier {command}'s output and also {foreign[0]!r}, which cimis "
                             f"{command} did not write", "move that away or choose another --out")
        if not overwrite:
            raise CimisError(f"{out} holds an earlier {command}'s output",
                             "pass --overwrite to replace it, or choose another --out")
        for name in present:
            item = out / name
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / marker).write_text(f"written by cimis {command}; safe to delete\n")
    except OSError as exc:
        raise CimisError(f"cannot write {out}: {exc.strerror or exc}", "choose a writable --out folder") from None


def _staging_leftover(name: str) -> bool:
    """A hidden staging file or folder an interrupted write left (``.NAME.xxxx.partial``)."""
    return name.startswith(".") and name.endswith(".partial")


def demo_configs(device: str, base_iterations: int, step_iterations: int):
    preprocess = PreprocessConfig(spacing=DEMO_SPACING, patch_size=DEMO_PATCH)
    base = single_pass_config(base_iterations, 3e-3, device)
    # A step at step 0's learning rate: at a tenth the new organs barely start (docs/method.md).
    step = single_pass_config(step_iterations, 3e-3, device)
    return preprocess, base, step


def run_demo(out: Path, device: str = "auto", overwrite: bool = False, segmentation_only: bool = False,
             base_iterations: int | None = None, step_iterations: int = STEP_ITERATIONS) -> None:
    started = time.perf_counter()
    elapsed = lambda: f"{(time.perf_counter() - started) / 60:.1f} min"  # noqa: E731
    if base_iterations is None:
        base_iterations = SEGMENTATION_ITERATIONS if segmentation_only else BASE_ITERATIONS
    prepare_output(out, overwrite)
    print(f"writing {DEMO_CASES} synthetic abdominal CT phantoms (13 BTCV organs, {DEMO_SPACING[0]:g} mm)")
    manifest_path = write_phantom_dataset(out / "phantoms", DEMO_CASES, "btcv", tuple(DEMO_SPACING), seed=0)
    manifest = Manifest.load(manifest_path)
    preprocess, base_config, step_config = demo_configs(device, base_iterations, step_iterations)
    (test_case,) = manifest.cases_in("test")

    joint_dir = out / "joint" if segmentation_only else out / "story" / "joint"

    def show_joint(report) -> None:
        print(report.to_markdown())
        print(f"all 13 organs, held-out phantom: mean Dice {report.overall_mean_dice():.3f} ({elapsed()})")
        overlay_png(read_image(test_case.image),
                    {"reference": read_image(test_case.label),
                     "prediction": read_image(joint_dir / "predictions" / f"{test_case.id}.nii.gz")},
                    manifest.classes, out / "segmentation.png", title=f"held-out phantom {test_case.id}")

    if segmentation_only:
        print(f"training a small 3D U-Net on all 13 organs ({base_iterations} iterations)")
        model = train_model(manifest, joint_dir, manifest.classes, "small", preprocess, base_config)
        show_joint(evaluate_model(model, manifest, "test", device, joint_dir / "predictions"))
        print(f"picture: {out / 'segmentation.png'}")
        return

    result = run_story(manifest_path, out / "story", OLD_ORGANS, NEW_ORGANS, preprocess, "small", base_config,
                       step_config, strategies=("ft", "pgcd-dapd"), joint=True, on_joint=show_joint)
    print(result.to_markdown())
    summary = result.summary()
    old_key = next(k for k in summary["base"] if k.startswith("old"))
    for name in ("ft", "pgcd-dapd"):
        kept = summary[name][old_key] / summary["base"][old_key]
        print(f"{name}: keeps {kept:.0%} of the base model's old-organ Dice")
    ratio = result.seconds_per_iteration["pgcd-dapd"] / result.seconds_per_iteration["ft"]
    print(f"cost of a pgcd-dapd iteration: {ratio:.2f}x an ft iteration")
    print(f"done in {elapsed()}; tables: {out / 'story' / 'story.md'}; pictures: {out / 'segmentation.png'}, "
          f"{out / 'story' / 'overlay.png'}")
