"""`cimis import-model` of MONAI bundles: the imported model segments as MONAI does with the source weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from cimis.cli import main
from cimis.model.modelfile import load_model

from .conftest import CLASS_NAMES, ROI, ct_volume, make_network, model_space


def monai_labels(net: torch.nn.Module, image: sitk.Image) -> np.ndarray:
    """MONAI's own sliding-window inference of the source network; argmax channels as (z, y, x)."""
    x = model_space(image)[None].float()
    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=ROI, sw_batch_size=2, predictor=net.eval(), overlap=0.25,
                                          mode="gaussian")
    return logits[0].argmax(0).numpy().transpose(2, 1, 0)


@pytest.mark.parametrize("name, fmt, weights", [("SegResNet", "json", "pt"), ("UNet", "yaml", "safetensors")])
def test_imported_model_segments_like_monai(tmp_path, bundle_factory, name, fmt, weights, capsys):
    net = make_network(name)
    bundle = bundle_factory(name, net=net, fmt=fmt, weights=weights)
    image = ct_volume()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    assert main(["import-model", str(bundle), "--out", str(tmp_path / "model")]) == 0
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["network"]["arch"] == "imported" and card["network"]["builder"] == f"monai.{name}"
    assert [c["name"] for c in card["classes"]] == CLASS_NAMES
    assert main(["segment", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "seg.nii.gz"), "--device", "cpu"]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    theirs = monai_labels(net, image)
    assert ours.shape == theirs.shape
    assert len(np.unique(theirs)) >= 3, "the source must predict several classes for the check to mean anything"
    agreement = float((ours == theirs).mean())
    assert agreement >= 0.999, agreement
