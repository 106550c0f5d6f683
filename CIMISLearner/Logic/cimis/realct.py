"""The incremental story on the real CT of ``shared/data/totalseg_example``.

One abdominal CT with TotalSegmentator labels mapped to BTCV organs: step 0 learns the large organs, one
step learns vessels, gallbladder and pancreas from labels that carry only them, with ``ft`` and
``pgcd-dapd``. There is a single case, so training and evaluation use the same volume: the run measures
forgetting (how much of each old organ's Dice survives the step) on real anatomy, not generalisation.
Nothing is tuned on it.

The same story runs across patients on any labelled dataset with a manifest (``cimis manifest`` writes one
for BTCV, WORD, Decathlon or TotalSegmentator folders as they are published, docs/manifest.md): trained on
its ``train`` split, scored on its ``test`` split (:func:`run_manifest_story`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from cimis.data.adapters import TOTALSEG_CASE_ID, from_totalseg_example
from cimis.data.manifest import Manifest
from cimis.data.io import write_text_atomic
from cimis.data.preprocess import PreprocessConfig
from cimis.demo import prepare_output
from cimis.errors import CimisError
from cimis.metrics import format_class_table
from cimis.story import StoryResult, run_story, single_pass_config

REAL_CT_SPACING = [3.0, 3.0, 3.0]  # the CT's own
REAL_CT_PATCH = [64, 64, 64]
REAL_CT_OLD = ["spleen", "right kidney", "left kidney", "liver", "stomach"]
REAL_CT_NEW = ["aorta", "inferior vena cava", "gallbladder", "pancreas"]
BASE_ITERATIONS = 300
STEP_ITERATIONS = 200
STORY_MARKER = ".cimis-story"
# What the story writes at the top of its folder (run_story's models and tables, the survival table).
STORY_ENTRIES = (STORY_MARKER, "manifest.json", "base", "step_data", "ft", "pgcd-dapd", "story.md", "story.json",
                 "overlay.png", "survival.md")


def run_real_ct_story(folder: Path, out: Path, device: str = "auto", overwrite: bool = False,
                      base_iterations: int = BASE_ITERATIONS, step_iterations: int = STEP_ITERATIONS,
                      learning_rate: float = 3e-3) -> StoryResult:
    """Base model on :data:`REAL_CT_OLD`, one step learning :data:`REAL_CT_NEW`; writes ``out/story.md``,
    ``story.json``, ``overlay.png`` and a per-organ survival table ``survival.md``."""
    started = time.perf_counter()
    example = from_totalseg_example(folder)  # checks the input before anything is written
    prepare_output(out, overwrite, "story", STORY_MARKER, STORY_ENTRIES)
    # The only case is trained on and evaluated (split "train"; see the module docstring).
    manifest = replace(example, splits={"train": [TOTALSEG_CASE_ID], "val": [TOTALSEG_CASE_ID]})
    return _tell_story(manifest, out, REAL_CT_OLD, REAL_CT_NEW, REAL_CT_SPACING, "train", device,
                       base_iterations, step_iterations, learning_rate, started)


def run_manifest_story(manifest_path: Path, out: Path, old: list[str] | None = None, new: list[str] | None = None,
                       spacing: list[float] | None = None, device: str = "auto", overwrite: bool = False,
                       base_iterations: int = BASE_ITERATIONS, step_iterations: int = STEP_ITERATIONS,
                       learning_rate: float = 3e-3) -> StoryResult:
    """The story across patients: trained on the manifest's ``train`` split (validated on ``val`` when it
    has one), scored on its ``test`` split. ``old`` and ``new`` default to the real-CT story's organs."""
    started = time.perf_counter()
    manifest = Manifest.load(manifest_path)  # checks the input before anything is written
    old, new = list(old or REAL_CT_OLD), list(new or REAL_CT_NEW)
    missing = [n for n in old + new if n not in manifest.classes.names]
    if missing:
        raise CimisError(f"{manifest_path} has no class {', '.join(map(repr, missing))}",
                         f"choose --old and --new among: {', '.join(manifest.classes.names)}")
    if set(old) & set(new):
        raise CimisError(f"{', '.join(sorted(set(old) & set(new)))} is both old and new", "give each organ once")
    for split in ("train", "test"):
        if not manifest.splits.get(split):
            raise CimisError(f"{manifest_path} has no {split!r} cases",
                             "the story trains on the 'train' split and scores on the 'test' split")
    prepare_output(out, overwrite, "story", STORY_MARKER, STORY_ENTRIES)
    if not manifest.splits.get("val"):  # validation only picks the checkpoint to keep: the training data will do
        manifest = replace(manifest, splits={**manifest.splits, "val": manifest.splits["train"]})
    return _tell_story(manifest, out, old, new, list(spacing or REAL_CT_SPACING), "test", device,
                       base_iterations, step_iterations, learning_rate, started)


def _tell_story(manifest: Manifest, out: Path, old: list[str], new: list[str], spacing: list[float],
                eval_split: str, device: str, base_iterations: int, step_iterations: int, learning_rate: float,
                started: float) -> StoryResult:
    """Save the manifest into the story's folder, run the story with ``ft`` and ``pgcd-dapd`` on the
    ``small`` network, write and print its tables and the survival table."""
    manifest_path = manifest.save(out / "manifest.json", overwrite=True)
    preprocess = PreprocessConfig(spacing=spacing, patch_size=REAL_CT_PATCH)
    base = single_pass_config(base_iterations, learning_rate, device)
    step = single_pass_config(step_iterations, learning_rate, device)
    result = run_story(manifest_path, out, old, new, preprocess, "small", base, step,
                       strategies=("ft", "pgcd-dapd"), joint=False, eval_split=eval_split)
    survival = survival_table(result)
    write_text_atomic(out / "survival.md", survival + "\n", overwrite=True)
    print(result.to_markdown())
    print(survival)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min; tables: {out / 'story.md'}, {out / 'survival.md'}")
    return result


def survival_table(result: StoryResult) -> str:
    """Per old organ: the base model's Dice and the share of it each strategy keeps after the step."""
    base = result.reports["base"].mean_dice()
    strategies = [m for m in result.reports if m not in ("base", "joint")]
    rows = {}
    for organ in result.old:
        dice = {m: result.reports[m].mean_dice().get(organ, float("nan")) for m in strategies}
        rows[organ] = {"base Dice": base[organ], **{f"{m} keeps": dice[m] / base[organ] if base[organ] > 0 else float("nan")
                                                     for m in strategies}}
    return "Share of each old organ's base Dice kept after the step\n\n" + format_class_table(
        rows, list(next(iter(rows.values()))), first_column="old organ")
