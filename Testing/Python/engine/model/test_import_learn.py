"""An imported model is version 0: every `cimis learn` strategy continues it (tiny budgets on phantoms)."""

from __future__ import annotations

import pytest

from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.incremental.learn import learn_step
from cimis.model.import_command import import_model
from cimis.model.modelfile import load_model, load_prototypes
from cimis.train import TrainConfig

from .conftest import CLASS_NAMES, write_bundle


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("import_learn")
    manifest = Manifest.load(write_phantom_dataset(out / "ds", num_cases=2, spacing=(8.0, 8.0, 8.0), seed=5,
                                                   val_cases=1, test_cases=0, progress=False))
    # The phantoms' own spacing and a small window keep each step to seconds.
    coarse = {"spacing": [8.0, 8.0, 8.0],
              "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 1}}
    bundle = write_bundle(out / "bundle", "SegResNet", inference_changes=coarse)
    model, _ = import_model(bundle, out / "imported")  # no --volumes: prototypes come at the learn step
    return manifest, model


@pytest.mark.parametrize("strategy", ["pgcd-dapd", "ft"])
def test_an_imported_model_learns_a_new_organ(imported, tmp_path, strategy):
    manifest, model = imported
    assert load_prototypes(model) is None
    config = TrainConfig(iterations=1, batch_size=1, samples_per_volume=1, device="cpu", val_every=1,
                         checkpoint_every=1, learning_rate=1e-5, augment=False)
    new_model = learn_step(model, manifest, tmp_path / "step", new_classes=["stomach"], strategy=strategy,
                           config=config, progress=False)
    net, card = load_model(new_model)
    assert card.classes.names == CLASS_NAMES + ["stomach"]
    assert net.num_channels == 5 and card.network.arch == "imported"
    assert [h["kind"] for h in card.history] == ["import", "learn"]
    bank, valid = load_prototypes(new_model, card)
    assert bank.shape == (5, card.network.feature_dim)
    if strategy == "pgcd-dapd":
        # The old model's confident predictions gave prototypes to the old classes it predicts on the phantoms.
        assert int(valid[1:4].sum()) >= 1
