"""An imported model's own intensity mapping and orientation (PreprocessConfig.normalization, orientation "")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cimis.data.preprocess import PreprocessConfig, model_space_transforms, sitk_to_metatensor
from cimis.model.card_limits import check_normalization
from cimis.errors import CimisError


def test_clip_zscore_is_nnunets_ct_normalisation(make_image):
    image = make_image(spacing=(2.0, 2.0, 2.0), direction="identity")
    config = PreprocessConfig(spacing=[2.0, 2.0, 2.0], orientation="",
                              normalization={"kind": "clip_zscore", "clip": [-50.0, 150.0], "mean": 30.0, "std": 40.0})
    raw = sitk_to_metatensor(image)
    out = model_space_transforms(config, with_label=False)({"image": raw})["image"]
    expected = (np.clip(raw.numpy(), -50, 150) - 30) / 40
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_window_with_its_own_range_and_no_reorientation(make_image):
    image = make_image(spacing=(2.0, 2.0, 2.0), direction="identity")  # LPS axes: RAS would flip x and y
    config = PreprocessConfig(spacing=[2.0, 2.0, 2.0], orientation="",
                              normalization={"kind": "window", "window": [-100.0, 100.0], "range": [-1.0, 1.0]})
    raw = sitk_to_metatensor(image)
    out = model_space_transforms(config, with_label=False)({"image": raw})["image"]
    # No Orientationd: the voxel order (and the flipped affine) stay the file's.
    np.testing.assert_allclose(out.numpy(), np.clip(raw.numpy(), -100, 100) / 100, rtol=1e-5, atol=1e-5)
    reoriented = model_space_transforms(PreprocessConfig(spacing=[2.0, 2.0, 2.0]), with_label=False)({"image": raw})["image"]
    assert not torch.equal(torch.as_tensor(reoriented.affine), torch.as_tensor(out.affine))


def test_cards_without_normalization_keep_their_meaning():
    config = PreprocessConfig()
    assert "normalization" not in config.to_json()
    assert config.intensity_mapping() == ([-175.0, 250.0], [0.0, 1.0])


@pytest.mark.parametrize("norm, field", [
    ({"kind": "zscore"}, "kind"),
    ({"kind": "window", "window": [100, -100], "range": [0, 1]}, "window"),
    ({"kind": "window", "window": [-100, 100], "range": [1, 1]}, "range"),
    ({"kind": "clip_zscore", "clip": [-1000, 1000], "mean": float("nan"), "std": 1}, "mean"),
    ({"kind": "clip_zscore", "clip": [-1000, 1000], "mean": 0, "std": -2}, "std"),
    ({"kind": "clip_zscore", "clip": [-1000, 1000], "mean": 0, "std": 2, "eval": "x"}, "normalization"),
])
def test_bad_normalizations_are_refused_naming_the_field(norm, field):
    with pytest.raises(CimisError, match=f"normalization.*{field}|{field}"):
        check_normalization(norm, "card.json", "preprocessing.normalization")
