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


SMALL_ARGS = {
    "SegResNet": ({"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1], "out_channels": 4}, 16),
    "UNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2]}, 16),
    "DynUNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                 "upsample_kernel_size": [2, 2], "filters": [4, 8, 8]}, 16),
    "UNETR": ({"in_channels": 1, "out_channels": 4, "img_size": [16, 16, 16], "feature_size": 4, "hidden_size": 16,
               "mlp_dim": 16, "num_heads": 2}, 16),
    "SwinUNETR": ({"in_channels": 1, "out_channels": 4, "feature_size": 12, "depths": [1, 1, 1, 1],
                   "num_heads": [1, 1, 1, 1], "window_size": 2}, 64),  # instance norm needs 2+ voxels at 1/32
}


@pytest.mark.parametrize("name", list(SMALL_ARGS))
def test_every_supported_network_keeps_its_logits_through_the_import(tmp_path, name):
    """The imported network (backbone + head taken from the final 1x1x1 conv) computes the source's logits."""
    from monai.networks import nets

    from cimis.model.import_command import import_source
    from cimis.model.monai_bundle import read_monai_bundle

    from .conftest import write_bundle

    args, size = SMALL_ARGS[name]
    torch.manual_seed(0)
    source = getattr(nets, name)(**args).eval()
    changes = {"network_def": {"_target_": name, **args},
               "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [size] * 3}}
    bundle = write_bundle(tmp_path / "b", name, net=source, inference_changes=changes)
    net, card = import_source(read_monai_bundle(bundle))
    x = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        logits, features = net.forward_with_features(x)
        torch.testing.assert_close(logits, source(x), rtol=1e-4, atol=1e-5)
    assert features.shape[1] == card.network.feature_dim
    assert (card.network.final_conv == "") == (name == "UNet")


def test_volumes_give_prototypes_from_confident_predictions(tmp_path, bundle_factory, capsys):
    from cimis.model.modelfile import load_prototypes

    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_volume(), str(image))
    net = make_network("SegResNet")
    with torch.no_grad():  # sharper logits: confident predictions (softmax >= 0.9) in many voxels
        net.conv_final[2].conv.weight.mul_(30)
        net.conv_final[2].conv.bias.mul_(30)
    assert main(["import-model", str(bundle_factory(net=net)), "--out", str(tmp_path / "m"), "--volumes", str(image)]) == 0
    prototypes = load_prototypes(tmp_path / "m")
    assert prototypes is not None
    bank, valid = prototypes
    _, card = load_model(tmp_path / "m")
    assert bank.shape == (4, card.network.feature_dim)
    assert int(valid.sum()) >= 2 and bool(torch.isfinite(bank).all())
    assert card.history[0]["prototypes"]["targets"] == "confident predictions"


def test_an_imported_model_starts_a_registry(tmp_path, bundle_factory, capsys):
    assert main(["import-model", str(bundle_factory()), "--out", str(tmp_path / "m")]) == 0
    assert main(["models", "import", str(tmp_path / "m"), "--registry", str(tmp_path / "reg"), "--activate"]) == 0
    assert main(["models", "export", "v0001", "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "a.tar.gz")]) == 0
    assert main(["models", "import", str(tmp_path / "a.tar.gz"), "--registry", str(tmp_path / "reg2"), "--activate"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "--registry", str(tmp_path / "reg2"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "liver" in json.dumps(shown) and "monai.SegResNet" in json.dumps(shown)
