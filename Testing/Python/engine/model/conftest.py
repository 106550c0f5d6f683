"""Tiny MONAI bundles written by the tests with MONAI's own network classes, and a CT to segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import SegResNet, UNet

SPACING = [4.0, 4.0, 4.0]
WINDOW = [-200.0, 300.0]
ROI = [32, 32, 32]
CLASS_NAMES = ["liver", "spleen", "kidney"]
# sitk direction whose MONAI (RAS) affine is diagonal: the volume is already in model space.
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

NETWORKS = {
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 4,
                  "blocks_down": [1, 1, 1], "blocks_up": [1, 1], "norm": ["group", {"num_groups": 2}]},
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1},
}


def ct_volume(size=(36, 32, 40), seed=0, spacing=None, origin=(12.0, -30.0, 7.0), direction=None) -> sitk.Image:
    """A CT-like volume (HU), by default at the bundles' spacing in RAS: air, a body, three blobs of other
    densities. ``size``, ``spacing`` and ``origin`` are in (x, y, z) order."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    array = np.full(z.shape, -1000.0)
    array[(x / 0.9) ** 2 + (y / 0.8) ** 2 < 1] = 40.0
    for cx, cy, cz, hu in ((-0.4, 0.1, 0.0, 120.0), (0.4, 0.2, 0.3, -80.0), (0.1, -0.4, -0.3, 250.0)):
        array[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 0.09] = hu
    array += rng.normal(0, 15, array.shape)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(tuple(SPACING if spacing is None else spacing))
    image.SetOrigin(tuple(origin))
    image.SetDirection(RAS_DIRECTION if direction is None else direction)
    return image


def model_space(image: sitk.Image) -> torch.Tensor:
    """The bundle's own preprocessing with MONAI's transforms: (1, X, Y, Z)."""
    from monai.transforms import Compose, Orientationd, ScaleIntensityRanged, Spacingd

    from cimis.data.preprocess import sitk_to_metatensor

    transform = Compose([Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=SPACING, mode="bilinear"),
                         ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True)])
    return transform({"image": sitk_to_metatensor(image)})["image"]


def make_network(name: str, seed: int = 0) -> torch.nn.Module:
    """A source network with weights that predict every class somewhere on :func:`ct_volume`: random
    weights, the final layer's biases shifted so that each class's logit margin has median zero."""
    torch.manual_seed(seed)
    args = NETWORKS[name]
    net = SegResNet(**{**args, "norm": tuple(args["norm"])}) if name == "SegResNet" else UNet(**args)
    net.eval()
    with torch.no_grad():
        x = model_space(ct_volume())[None, :, :32, :32, :32].float()
        logits = net(x)
        last = net.conv_final[2].conv if name == "SegResNet" else _last_bias(net)
        shift = torch.stack([logits[0, c].flatten().median() for c in range(logits.shape[1])])
        last.bias.sub_(shift)
    return net


def _last_bias(net: UNet) -> torch.nn.Module:
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    return convs[-1]


def write_bundle(root: Path, name: str = "SegResNet", net: torch.nn.Module | None = None, fmt: str = "json",
                 inference_changes: dict | None = None, metadata_changes: dict | None = None,
                 weights: str = "pt", class_names: list[str] = CLASS_NAMES) -> Path:
    """A MONAI bundle folder as the Model Zoo lays it out (configs/, models/), with literal values; the
    metadata names ``class_names`` as output channels 1, 2, ... after the background."""
    net = net if net is not None else make_network(name)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "spacing": SPACING,
        "network_def": {"_target_": f"monai.networks.nets.{name}", **NETWORKS.get(name, {})},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@spacing", "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": WINDOW[0], "a_max": WINDOW[1],
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 1, "overlap": 0.25},
    }
    for key, value in (inference_changes or {}).items():
        inference[key] = value
    metadata = {
        "version": "0.1.0", "monai_version": "1.6.1",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(class_names) + 1,
                                 "channel_def": {"0": "background", **{str(i + 1): n for i, n in enumerate(class_names)}}}},
        },
    }
    metadata.update(metadata_changes or {})
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    if fmt == "yaml":
        import yaml

        (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(inference))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    if weights == "pt":
        torch.save(net.state_dict(), root / "models" / "model.pt")
    elif weights == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "models" / "model.safetensors"))
    return root


@pytest.fixture
def bundle_factory(tmp_path):
    counter = iter(range(1000))

    def make(name: str = "SegResNet", **kwargs) -> Path:
        return write_bundle(tmp_path / f"bundle{next(counter)}", name, **kwargs)

    return make
