"""``cimis export --format monai-bundle``: a model folder as a MONAI bundle that runs without CIMISLearner.

The bundle holds ``configs/metadata.json`` (the class list as the output's ``channel_def``),
``configs/inference.json`` (MONAI's own transforms, sliding-window inferer and network classes, laid out
as the Model Zoo's segmentation bundles are, so ``python -m monai.bundle run``, MONAI Label and
SlicerMONAIAuto3DSeg read it) and ``models/model.pt`` (a plain state dict) with ``models/model.safetensors``.

Only networks that MONAI itself can build are exported: imported MONAI networks (the head folds back into
their final 1x1x1 convolution, or follows the network as a 1x1x1 ``Conv3d`` in a ``Sequential`` where the
network has none: UNet), and our own ``dynunet`` (the head becomes DynUNet's output block) and ``unet``
(UNet + 1x1x1 ``Conv3d``). nnU-Net networks are refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cimis import __version__
from cimis.data.io import check_replaceable_folder, replace_folder
from cimis.errors import CimisError
from cimis.model.modelfile import load_model
from cimis.model.network import NetworkConfig, SegmentationNet


def network_definition(net: SegmentationNet) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config entries that build the network in MONAI (``network_def`` and any parts it is made of) and
    the state dict in that network's names."""
    config = net.config
    head_weight = net.head.conv.weight.detach()
    head_bias = net.head.conv.bias.detach()
    channels = net.num_channels
    if config.arch == "imported":
        if not config.builder.startswith("monai."):
            raise CimisError(f"this model's network ({config.builder}) is not a MONAI network, so it cannot be "
                             "exported as a MONAI bundle", "export MONAI networks and CIMISLearner's own dynunet/unet")
        name = config.builder.split(".", 1)[1]
        backbone = net.backbone.net
        args = dict(config.args)
        if config.final_conv:
            state = {k: v for k, v in backbone.state_dict().items()}
            state[f"{config.final_conv}.weight"] = head_weight
            state[f"{config.final_conv}.bias"] = head_bias
            args["out_channels"] = channels
            return {"network_def": {"_target_": f"monai.networks.nets.{name}", **args}}, state
        return _sequential({"_target_": f"monai.networks.nets.{name}", **args}, backbone.state_dict(), head_weight, head_bias)
    if config.arch == "dynunet":
        state = dict(net.backbone.state_dict())
        state["output_block.conv.conv.weight"] = head_weight
        state["output_block.conv.conv.bias"] = head_bias
        return {"network_def": {
            "_target_": "monai.networks.nets.DynUNet", "spatial_dims": 3, "in_channels": config.in_channels,
            "out_channels": channels, "kernel_size": config.kernel_sizes, "strides": config.strides,
            "upsample_kernel_size": config.strides[1:], "filters": config.filters, "norm_name": _norm(config),
            "res_block": config.res_block, "deep_supervision": False}}, state
    if config.arch == "unet":
        backbone = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": config.in_channels,
                    "out_channels": config.feature_dim, "channels": config.filters, "strides": config.strides,
                    "num_res_units": config.num_res_units, "norm": _norm(config)}
        return _sequential(backbone, net.backbone.state_dict(), head_weight, head_bias)
    raise CimisError(f"network architecture {config.arch!r} cannot be exported as a MONAI bundle")


def _norm(config: NetworkConfig):
    return ["INSTANCE", {"affine": True}] if config.norm == "instance" else config.norm


def _sequential(backbone: dict, backbone_state: dict, weight: torch.Tensor, bias: torch.Tensor):
    """A network without a final 1x1x1 convolution: ``Sequential(network, Conv3d(D, C, 1))``."""
    head = {"_target_": "torch.nn.Conv3d", "in_channels": int(weight.shape[1]), "out_channels": int(weight.shape[0]),
            "kernel_size": 1}
    state = {f"0.{k}": v for k, v in backbone_state.items()}
    state["1.weight"], state["1.bias"] = weight, bias
    return {"backbone_def": backbone, "head_def": head,
            "network_def": "$torch.nn.Sequential(@backbone_def, @head_def)"}, state


def inference_config(card, network: dict) -> dict:
    """A Model Zoo style inference config: MONAI's transforms only, values from the card."""
    pre = card.preprocessing
    (a_min, a_max), (b_min, b_max) = pre.intensity_mapping()
    transforms = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    if pre.orientation:
        transforms.append({"_target_": "Orientationd", "keys": "image", "axcodes": pre.orientation})
    transforms += [
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(pre.spacing), "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": a_min, "a_max": a_max, "b_min": b_min,
         "b_max": b_max, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    channels = card.classes.num_channels
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **network,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(pre.patch_size), "sw_batch_size": 2,
                    "overlap": 0.25, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            # Output channels -> the model's label values (its classes keep their values on disk).
            {"_target_": "MapLabelValued", "keys": "pred", "orig_labels": list(range(channels)),
             "target_labels": [0] + list(card.classes.values)},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False, "output_dtype": "$numpy.uint16"},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(card, model_dir: Path) -> dict:
    import monai

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": f"0.{len(card.history)}.0",
        "changelog": {f"0.{len(card.history)}.0": f"exported by CIMISLearner {__version__} from {model_dir.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {},
        "name": f"CIMISLearner model {model_dir.name}",
        "task": "CT segmentation",
        "description": "Exported by `cimis export --format monai-bundle`. Output channels are listed in "
                       "channel_def; the saved label maps hold each class's label value (label_values).",
        "authors": "CIMISLearner",
        "copyright": "",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(card.preprocessing.patch_size), "dtype": "float32",
                                 "value_range": [], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": card.classes.num_channels,
                                 "spatial_shape": list(card.preprocessing.patch_size), "dtype": "float32",
                                 "value_range": [], "is_patch_data": True,
                                 "channel_def": {"0": "background", **{str(i + 1): c.name for i, c in enumerate(card.classes)}},
                                 "label_values": {c.name: c.value for c in card.classes}}},
        },
    }


# What an export writes at the top of its folder: --overwrite replaces a folder holding only these.
BUNDLE_ENTRIES = {"configs", "models", "LICENSE"}


def export_monai_bundle(model_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model_dir`` as a MONAI bundle folder ``out`` (complete or not at all)."""
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir), Path(out)
    check_replaceable_folder(out, overwrite, BUNDLE_ENTRIES, "configs/metadata.json", "exported bundle")
    net, card = load_model(model_dir)
    network, state = network_definition(net)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        (staging / "configs" / "inference.json").write_text(json.dumps(inference_config(card, network), indent=2) + "\n")
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata(card, model_dir), indent=2) + "\n")
        torch.save(state, staging / "models" / "model.pt")
        # safetensors refuses shared storage (DynUNet's aliased layers): clone each tensor.
        save_file({k: v.clone() for k, v in state.items()}, str(staging / "models" / "model.safetensors"))
        (staging / "LICENSE").write_text("See the license of the model this bundle was exported from.\n")
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
