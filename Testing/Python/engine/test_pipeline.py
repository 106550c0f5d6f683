"""Train -> segment -> evaluate on tiny phantoms through the real engine, and resume after a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cimis.data.io import read_image
from cimis.data.manifest import Manifest
from cimis.data.phantom import write_phantom_dataset
from cimis.data.preprocess import PreprocessConfig
from cimis.evaluate import evaluate_folder
from cimis.infer import segment_file
from cimis.model.modelfile import load_model
from cimis.model.network import NetworkConfig
from cimis.train import TrainConfig, train_model

TINY_NET = NetworkConfig(filters=[4, 8, 16], kernel_sizes=[3, 3, 3], strides=[1, 2, 2])
TINY_PREPROCESS = PreprocessConfig(spacing=[8.0, 8.0, 8.0], patch_size=[32, 32, 16])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out / "ds", num_cases=4, spacing=(6.0, 6.0, 6.0), seed=3, progress=False)


def _config(**kw):
    base = dict(iterations=6, batch_size=2, val_every=3, checkpoint_every=3, device="cpu", augment=True)
    base.update(kw)
    return TrainConfig(**base)


def test_train_segment_evaluate(phantoms, tmp_path):
    manifest = Manifest.load(phantoms)
    model = train_model(manifest, tmp_path / "run", network=TINY_NET, preprocess=TINY_PREPROCESS,
                        config=_config(), progress=False)
    net, card = load_model(model)
    assert card.classes == manifest.classes
    (entry,) = card.history
    assert [v["iteration"] for v in entry["validation"]] == [3, 6]
    assert set(entry["validation"][-1]["dice"]) == set(manifest.classes.names)
    assert entry["seconds_per_iteration"] > 0

    (test_case,) = manifest.cases_in("test")
    output = tmp_path / "pred" / f"{test_case.id}.nii.gz"
    result = segment_file(model, test_case.image, output, device="cpu")
    image, written = read_image(test_case.image), read_image(output)
    # The label map is written on the input's exact grid, with class values only.
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, *manifest.classes.values}
    assert set(result.volumes_ml) == set(manifest.classes.names)

    report = evaluate_folder(phantoms, "test", tmp_path / "pred")
    paths = report.write(tmp_path / "eval")
    saved = json.loads(paths["json"].read_text())
    assert saved["num_cases"] == 1
    assert set(report.mean_dice()) == set(manifest.classes.names)
    assert all(0.0 <= d <= 1.0 for d in report.mean_dice().values() if np.isfinite(d))


def test_training_on_a_subset_of_classes(phantoms, tmp_path):
    manifest = Manifest.load(phantoms)
    subset = manifest.classes.subset(["liver", "spleen", "aorta"])
    model = train_model(manifest, tmp_path / "run", classes=subset, network=TINY_NET,
                        preprocess=TINY_PREPROCESS, config=_config(iterations=2), progress=False)
    net, card = load_model(model)
    assert card.classes.names == ["spleen", "liver", "aorta"]  # the manifest's order
    assert net.num_channels == 4


class _Crash(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint(phantoms, tmp_path):
    manifest = Manifest.load(phantoms)

    def crash_after_four(kind, payload):
        if kind == "progress" and payload["iteration"] == 4:
            raise _Crash()

    with pytest.raises(_Crash):
        train_model(manifest, tmp_path / "run", network=TINY_NET, preprocess=TINY_PREPROCESS,
                    config=_config(), on_event=crash_after_four, progress=False)
    assert not (tmp_path / "run" / "model").exists()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 3

    seen = []
    model = train_model(manifest, tmp_path / "run", network=TINY_NET, preprocess=TINY_PREPROCESS,
                        config=_config(), resume=True, on_event=lambda k, p: seen.append((k, p)), progress=False)
    iterations = [p["iteration"] for k, p in seen if k == "progress"]
    assert iterations == [4, 5, 6]  # only what the crash lost is redone
    _, card = load_model(model)
    # The validation at iteration 3 was done before the crash and is kept in the history.
    assert [v["iteration"] for v in card.history[0]["validation"]] == [3, 6]
