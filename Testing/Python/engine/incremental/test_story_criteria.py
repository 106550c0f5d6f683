"""Issue 4's criteria on a small phantom story: a base model, one step learning new organs from new-only
labels with ``ft`` and ``pgcd-dapd``, both evaluated with full labels on a held-out phantom.

- ``pgcd-dapd`` keeps the old organs' mean Dice within 5 points of the base model's;
- ``ft`` loses most of it (keeps less than half);
- ``pgcd-dapd`` reaches at least 90% of ``ft``'s mean Dice on the new organs.

Small sizes (6 mm phantoms, the ``small`` network preset of the demo) keep it to a few minutes on two CPU
cores; the step's budget and learning rate are step 0's, the defaults of ``cimis learn`` (docs/method.md).
The step's weights were chosen on this story's validation phantom, never on the test phantom scored here
(docs/method.md has the runs). With a narrower 8-channel feature level the new aorta lagged (about 90% of
``ft``'s new-organ Dice even with the feature term off): the features the head reads need room for the
new classes beside the old ones.
"""

from __future__ import annotations

import pytest

from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.story import run_story
from cimis.train import TrainConfig

SPACING = [6.0, 6.0, 6.0]
PATCH = [48, 48, 32]
NETWORK = "small"  # the demo's network: a residual UNet with 16..128 channels
OLD = ["spleen", "right kidney", "left kidney", "liver"]
NEW = ["stomach", "aorta"]
BASE_ITERATIONS = 250
STEP_ITERATIONS = BASE_ITERATIONS  # step 0's budget, as cimis learn defaults to
LEARNING_RATE = 3e-3


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    out = tmp_path_factory.mktemp("story")
    manifest = write_phantom_dataset(out / "phantoms", num_cases=8, spacing=tuple(SPACING), seed=3, progress=False)
    preprocess = PreprocessConfig(spacing=SPACING, patch_size=PATCH)

    def config(iterations):
        return TrainConfig(iterations=iterations, batch_size=2, learning_rate=LEARNING_RATE, device="cpu",
                           val_every=iterations, checkpoint_every=iterations)

    return run_story(manifest, out / "run", OLD, NEW, preprocess, NETWORK, config(BASE_ITERATIONS),
                     config(STEP_ITERATIONS), strategies=("ft", "pgcd-dapd"), joint=False, progress=False)


def _means(story):
    summary = story.summary()
    old_key, new_key = f"old ({len(OLD)})", f"new ({len(NEW)})"
    return {name: (row[old_key], row[new_key]) for name, row in summary.items()}


def test_base_model_segments_its_organs(story):
    base_old, _ = _means(story)["base"]
    assert base_old > 0.6, story.to_markdown()


def test_pgcd_dapd_keeps_the_old_organs(story):
    means = _means(story)
    assert means["pgcd-dapd"][0] >= means["base"][0] - 0.05, story.to_markdown()


def test_fine_tuning_learns_the_new_organs_and_forgets_the_old(story):
    means = _means(story)
    assert means["ft"][1] > 0.5, story.to_markdown()  # the step's budget suffices to learn them
    assert means["ft"][0] < 0.5 * means["base"][0], story.to_markdown()


def test_pgcd_dapd_learns_the_new_organs_at_all(story):
    # The specification's defaults learned none (docs/method.md); this guards the fix.
    assert _means(story)["pgcd-dapd"][1] > 0.5, story.to_markdown()


def test_pgcd_dapd_learns_the_new_organs(story):
    means = _means(story)
    assert means["pgcd-dapd"][1] >= 0.9 * means["ft"][1], story.to_markdown()


def test_story_writes_its_tables_and_picture(story, tmp_path_factory):
    run = next(p for p in tmp_path_factory.getbasetemp().glob("story*/run"))
    assert (run / "story.md").read_text().count("pgcd-dapd") >= 2
    assert (run / "overlay.png").stat().st_size > 10_000
