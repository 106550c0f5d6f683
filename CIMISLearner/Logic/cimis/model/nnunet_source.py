"""Read an nnU-Net v2 trained-model folder (the layout TotalSegmentator installs) as a :class:`SourceModel`.

The folder holds ``dataset.json`` (class names and label values), ``plans.json`` (network architecture,
target spacing, patch size, intensity statistics) and ``fold_N/checkpoint_final.pth`` (or
``checkpoint_best.pth``), a ``torch.save`` of a dict whose ``network_weights`` are the state dict. Nothing
from the folder is executed: the JSON files are read as data (the dotted class names of nnU-Net's plans are
matched against a fixed table, never imported) and the checkpoint is unpickled with
``weights_only=True``, allowing besides tensors and containers only the numpy scalars that nnU-Net's
training log holds.

Axis order. nnU-Net works on the numpy array of a SimpleITK image, ``(z, y, x)``, optionally transposed by
the plans' ``transpose_forward``; CIMISLearner's preprocessing gives ``(x, y, z)``. The spacing and patch
size are reordered here, and :func:`build_network` wraps the network so that it takes and returns tensors in
our order (see :class:`NnUNetInOurAxes`).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimis.errors import CimisError
from cimis.model.card_limits import MAX_CLASSES, MAX_FILTERS, MAX_KERNEL, MAX_LEVELS, MAX_PATCH_AXIS, MAX_STRIDE
from cimis.model.source_model import SourceModel

BUILDERS = ("nnunet.PlainConvUNet", "nnunet.ResidualEncoderUNet")
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
DEFAULT_CONFIGURATION = "3d_fullres"
_INSTALL_HINT = 'install the nnU-Net extra: pip install "cimis[nnunet]"'
_MAX_JSON_BYTES = 64 * 1024 * 1024  # plans of real models are tens of kB
_NUMPY_SCALAR_TYPES = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
_MAX_BLOCKS = 16  # convolutions or residual blocks per stage (nnU-Net's ResEnc-L has 6)

# nnU-Net's plans name the network class and its ops by dotted path; these are the ones we build.
_NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "nnunet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "nnunet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "nnunet.ResidualEncoderUNet",
}
_OLD_FORMAT_CLASSES = {"PlainConvUNet": "nnunet.PlainConvUNet", "ResidualEncoderUNet": "nnunet.ResidualEncoderUNet"}
# Dotted names in plans -> the short names stored in the card (3D ops only: CT volumes).
_OP_NAMES = {
    "conv_op": {"torch.nn.modules.conv.Conv3d": "Conv3d", "torch.nn.Conv3d": "Conv3d"},
    "norm_op": {
        "torch.nn.modules.instancenorm.InstanceNorm3d": "InstanceNorm3d", "torch.nn.InstanceNorm3d": "InstanceNorm3d",
        "torch.nn.modules.batchnorm.BatchNorm3d": "BatchNorm3d", "torch.nn.BatchNorm3d": "BatchNorm3d",
    },
    "dropout_op": {"torch.nn.modules.dropout.Dropout3d": "Dropout3d", "torch.nn.Dropout3d": "Dropout3d",
                   "torch.nn.modules.dropout.Dropout": "Dropout", "torch.nn.Dropout": "Dropout"},
    "nonlin": {
        f"torch.nn{m}.{name}": name for m in ("", ".modules.activation")
        for name in ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU")
    },
    "block": {"dynamic_network_architectures.building_blocks.residual.BasicBlockD": "BasicBlockD",
              "dynamic_network_architectures.building_blocks.residual.BottleneckD": "BottleneckD"},
}
# The keyword arguments each op may get (plain numbers and booleans only).
_OP_KWARGS = {
    "norm_op_kwargs": {"eps": float, "affine": bool, "momentum": float, "track_running_stats": bool},
    "nonlin_kwargs": {"inplace": bool, "negative_slope": float},
    "dropout_op_kwargs": {"p": float, "inplace": bool},
}
_COMMON_KEYS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage_decoder",
                "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
                "nonlin_kwargs"}
_ARCH_KEYS = {
    "nnunet.PlainConvUNet": _COMMON_KEYS | {"n_conv_per_stage", "nonlin_first"},
    "nnunet.ResidualEncoderUNet": _COMMON_KEYS | {"n_blocks_per_stage", "block", "bottleneck_channels",
                                                  "stem_channels"},
}
_REQUIRED_KEYS = {
    "nnunet.PlainConvUNet": {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                             "n_conv_per_stage", "n_conv_per_stage_decoder"},
    "nnunet.ResidualEncoderUNet": {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                                   "n_blocks_per_stage", "n_conv_per_stage_decoder"},
}


def is_nnunet_folder(path: Path) -> bool:
    """Whether ``path`` looks like an nnU-Net v2 trained-model folder (it has plans.json and dataset.json)."""
    path = Path(path)
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def nnunet_class_names(folder: Path) -> list[str]:
    """The model's class names after background, in channel order, from dataset.json alone (no checkpoint
    read): what a class chooser offers."""
    path = Path(folder) / "dataset.json"
    return _read_labels(_read_json(path), path)[0]

# =========================================================================================== reading
def read_nnunet(folder: Path, fold: int | str | None = None, configuration: str | None = None) -> SourceModel:
    """Read an nnU-Net v2 trained-model folder without executing anything from it.

    Args:
        folder: the folder with ``dataset.json``, ``plans.json`` and ``fold_*/checkpoint_final.pth``.
        fold: the fold to take (an integer, or ``"all"``); ``None`` takes the first present and says so in
            the notes.
        configuration: the plans configuration; ``None`` takes the one the checkpoint was trained with
            (``init_args["configuration"]``), else ``"3d_fullres"``.

    Returns:
        a :class:`SourceModel` whose ``state_dict`` loads into ``build_network(builder, args)``.

    Raises:
        CimisError: one line naming the file (and key) that is missing, malformed or unsupported.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CimisError(f"{folder}: not a folder (an nnU-Net model is a folder with dataset.json, plans.json "
                         f"and fold_N/checkpoint_final.pth)")
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    notes: list[str] = []
    class_names, label_values = _read_labels(dataset, folder / "dataset.json")
    _check_one_channel(dataset, folder / "dataset.json")

    checkpoint_path = _choose_checkpoint(folder, fold, notes)
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict = _network_weights(checkpoint, checkpoint_path)
    init_args = checkpoint.get("init_args")
    trained_with = init_args.get("configuration") if isinstance(init_args, dict) else None
    trainer = checkpoint.get("trainer_name")
    del checkpoint, init_args  # the optimizer's state is as large as the weights
    if configuration is None:
        configuration = trained_with if isinstance(trained_with, str) else DEFAULT_CONFIGURATION
    plans_file = folder / "plans.json"
    config = _resolve_configuration(plans, configuration, plans_file)
    where = f"configurations.{configuration}"
    if config.get("previous_stage") is not None:
        raise CimisError(f"{plans_file}: {where} is the second stage of a cascade (previous_stage "
                         f"{str(config['previous_stage'])[:60]!r}): its network also reads the first stage's "
                         f"segmentation, so it cannot be imported alone")
    network_axes = _network_axes(plans, plans_file)
    spacing = _in_our_order(_numbers(config.get("spacing"), plans_file, f"{where}.spacing", 0.01, 100.0),
                            network_axes)
    patch_size = _in_our_order(_ints(config.get("patch_size"), plans_file, f"{where}.patch_size", 1, MAX_PATCH_AXIS),
                               network_axes)
    builder, arch_kwargs = _architecture(config, plans_file, where)
    normalization = _normalization(plans, config, plans_file, where)
    orientation = _orientation(plans, notes)
    notes.append("nnU-Net resamples images with third-order splines; CIMISLearner resamples linearly, so "
                 "predictions near organ borders can differ slightly from nnU-Net's own")

    args = {"input_channels": 1, "num_classes": len(class_names) + 1, **arch_kwargs, "network_axes": network_axes}
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        network = build_network(builder, args)
    state_dict = {f"network.{k}": v for k, v in state_dict.items()}
    hint = None
    if isinstance(trainer, str) and trainer != "nnUNetTrainer":
        hint = (f"the checkpoint was trained by {trainer[:80]}; a trainer that builds its own network instead of "
                f"the plans' cannot be imported")
    check_state_dict(network, state_dict, checkpoint_path, hint)
    return SourceModel(
        kind="nnunet", builder=builder, args=args, state_dict=state_dict,
        final_conv=f"network.decoder.seg_layers.{arch_kwargs['n_stages'] - 2}",
        class_names=class_names, label_values=label_values, spacing=spacing, patch_size=patch_size,
        orientation=orientation, normalization=normalization, notes=notes,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CimisError(f"{path}: missing (an nnU-Net model folder has dataset.json, plans.json and "
                         f"fold_N/checkpoint_final.pth)")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CimisError(f"{path}: {path.stat().st_size} bytes, far more than an nnU-Net {path.name} holds")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CimisError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CimisError(f"{path}: nested too deeply to be an nnU-Net {path.name}") from None
    if not isinstance(data, dict):
        raise CimisError(f"{path}: must hold a JSON object")
    return data


def _choose_checkpoint(folder: Path, fold: int | str | None, notes: list[str]) -> Path:
    """The fold's checkpoint file (``checkpoint_final.pth``, else ``checkpoint_best.pth``)."""
    present: dict[str, Path] = {}
    for sub in folder.iterdir():
        match = re.fullmatch(r"fold_(\d+|all)", sub.name)
        if match and sub.is_dir():
            checkpoint = next((sub / n for n in CHECKPOINT_NAMES if (sub / n).is_file()), None)
            if checkpoint is not None:
                present[match.group(1)] = checkpoint
    order = sorted(present, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
    if not order:
        raise CimisError(f"{folder}: no fold_N/checkpoint_final.pth (nor checkpoint_best.pth); "
                         f"is this an nnU-Net results folder of a trained model?")
    if fold is None:
        chosen = order[0]
        if len(order) > 1:
            notes.append(f"folds present: {', '.join(order)}; using fold {chosen} (choose another with --fold)")
        else:
            notes.append(f"using fold {chosen}, the only fold present")
    else:
        chosen = str(fold)
        if chosen not in present:
            raise CimisError(f"{folder}: no fold_{chosen}/checkpoint_final.pth (nor checkpoint_best.pth); "
                             f"folds present: {', '.join(order)}")
    if present[chosen].name != CHECKPOINT_NAMES[0]:
        notes.append(f"fold_{chosen} has no {CHECKPOINT_NAMES[0]}; using {present[chosen].name}")
    return present[chosen]


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint as a dict, unpickled with ``weights_only=True``.

    nnU-Net's trainer saves ``network_weights``, ``optimizer_state``, ``grad_scaler_state``, ``logging``
    (lists of numpy float scalars), ``_best_ema`` (a numpy float), ``current_epoch``, ``init_args`` (plans,
    dataset.json, a ``torch.device``), ``trainer_name`` and ``inference_allowed_mirroring_axes``. Of the
    non-torch types only numpy's scalar constructor and ``numpy.dtype`` with its numeric dtype classes are
    allowed (the constructor under both its numpy 1 and numpy 2 module names); anything else, such as a
    ``__reduce__`` payload, is refused before it runs.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        raise CimisError(f"{path}: reading nnU-Net checkpoints safely needs torch 2.5 or newer "
                         f"(this is torch {torch.__version__})", "upgrade torch")
    import numpy as np

    numpy_scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar  # numpy 2 / numpy 1
    allowed = [(numpy_scalar, "numpy._core.multiarray.scalar"), (numpy_scalar, "numpy.core.multiarray.scalar"),
               (np.dtype, "numpy.dtype")]
    # Unpickling a dtype sets its state, which torch allows only for listed classes: the numeric ones.
    allowed += [type(np.dtype(name)) for name in _NUMPY_SCALAR_TYPES]
    try:
        with safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" not in text and "allowlisted" not in text:  # not a refused object: a damaged file
            raise CimisError(f"{path}: not a readable PyTorch checkpoint ({_last_line(text)})") from None
        found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", text)
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise CimisError(f"{path}: holds Python objects other than tensors and plain values{what}; refused, "
                         f"nothing from the file was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CimisError(f"{path}: not a readable PyTorch checkpoint ({_last_line(str(exc))})") from None
    if not isinstance(checkpoint, dict):
        raise CimisError(f"{path}: not an nnU-Net checkpoint (a dict with 'network_weights')")
    return checkpoint


def _last_line(text: str) -> str:
    """The gist of a library's multi-line message (torch puts advice first, the cause last)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Check the doc")]
    return (lines[-1] if lines else "unknown error")[:200]


def _network_weights(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, without the prefixes of ``torch.compile`` and DataParallel / DDP."""
    weights = checkpoint.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise CimisError(f"{path}: key 'network_weights' missing or empty (not an nnU-Net v2 checkpoint)")
    cleaned = {}
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CimisError(f"{path}: 'network_weights' must map parameter names to tensors")
        name = key
        while name.startswith(("_orig_mod.", "module.")):
            name = name.split(".", 1)[1]
        cleaned[name] = value
    return cleaned


def _resolve_configuration(plans: dict, name: str, plans_file: Path) -> dict:
    """The configuration with its ``inherits_from`` chain resolved (as nnU-Net's PlansManager does)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        raise CimisError(f"{plans_file}: key 'configurations' missing or not an object")
    chain: list[str] = []
    current = name
    while True:
        if current not in configurations or not isinstance(configurations[current], dict):
            raise CimisError(f"{plans_file}: no configuration {current!r} in 'configurations' "
                             f"(present: {', '.join(map(str, configurations))})")
        if current in chain:
            raise CimisError(f"{plans_file}: configurations.{name}.inherits_from is circular "
                             f"({' -> '.join(chain + [current])})")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        current = parent
    resolved: dict = {}
    for link in reversed(chain):
        resolved.update(configurations[link])
    return resolved


def _read_labels(dataset: dict, path: Path) -> tuple[list[str], list[int]]:
    """Class names and label values in output-channel order (channel c predicts label c, background 0)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise CimisError(f"{path}: key 'labels' missing or not an object of name -> label value")
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":  # nnU-Net's unannotated-voxel marker, not an output channel
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, list):
            raise CimisError(f"{path}: labels.{name} is a region (a list of labels); region-based nnU-Net models "
                             f"(sigmoid outputs of overlapping regions) cannot be imported")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CLASSES:
            raise CimisError(f"{path}: labels.{name} must be a label value from 0 to {MAX_CLASSES}")
        if value in by_value:
            raise CimisError(f"{path}: labels.{name} and labels.{by_value[value]} both have value {value}")
        by_value[value] = name
    if 0 not in by_value:
        raise CimisError(f"{path}: 'labels' has no background (label value 0)")
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise CimisError(f"{path}: label values {values} are not consecutive from 0, as nnU-Net requires")
    if len(values) < 2:
        raise CimisError(f"{path}: 'labels' has only the background")
    return [by_value[v] for v in values[1:]], values[1:]


def _check_one_channel(dataset: dict, path: Path) -> None:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if isinstance(channels, dict) and len(channels) != 1:
        raise CimisError(f"{path}: channel_names lists {len(channels)} input channels; only single-channel (CT) "
                         f"models can be imported")


# ------------------------------------------------------------------------------------- architecture
def _architecture(config: dict, plans_file: Path, where: str) -> tuple[str, dict]:
    """The builder key and the network's keyword arguments as plain JSON (op classes as short names)."""
    if "architecture" not in config:
        return _architecture_from_old_plans(config, plans_file, where)
    arch = config["architecture"]
    key = f"{where}.architecture"
    if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
        raise CimisError(f"{plans_file}: {key} must be an object with network_class_name and arch_kwargs")
    class_name = arch.get("network_class_name")
    builder = _NETWORK_CLASSES.get(class_name) if isinstance(class_name, str) else None
    if builder is None:
        raise CimisError(f"{plans_file}: {key}.network_class_name is {str(class_name)[:120]!r}; supported: "
                         f"PlainConvUNet and ResidualEncoderUNet of dynamic_network_architectures")
    kwargs = dict(arch["arch_kwargs"])
    kwargs.pop("deep_supervision", None)  # decided here: off, for inference and training
    for name, table in _OP_NAMES.items():
        if name in kwargs and kwargs[name] is not None:
            dotted = kwargs[name]
            if dotted not in table:
                only_3d = " (only 3D configurations can be imported)" if name == "conv_op" else ""
                raise CimisError(f"{plans_file}: {key}.arch_kwargs.{name} is {str(dotted)[:120]!r}, not one of "
                                 f"{', '.join(sorted(set(table.values())))}{only_3d}")
            kwargs[name] = table[dotted]
    _check_arch_kwargs(builder, kwargs, f"{plans_file}: {key}.arch_kwargs")
    return builder, kwargs


def _architecture_from_old_plans(config: dict, plans_file: Path, where: str) -> tuple[str, dict]:
    """Plans written before nnU-Net v2.4 name the class and list the stages; map them as nnU-Net's
    ConfigurationManager does."""
    class_name = config.get("UNet_class_name")
    builder = _OLD_FORMAT_CLASSES.get(class_name) if isinstance(class_name, str) else None
    if builder is None:
        if class_name is None:
            raise CimisError(f"{plans_file}: {where} has neither 'architecture' nor 'UNet_class_name'")
        raise CimisError(f"{plans_file}: {where}.UNet_class_name is {str(class_name)[:120]!r}; supported: "
                         f"PlainConvUNet and ResidualEncoderUNet")
    for key in ("n_conv_per_stage_encoder", "n_conv_per_stage_decoder", "conv_kernel_sizes", "pool_op_kernel_sizes",
                "UNet_base_num_features", "unet_max_num_features", "patch_size"):
        if key not in config:
            raise CimisError(f"{plans_file}: {where}.{key} missing")
    if not isinstance(config["n_conv_per_stage_encoder"], list) or not isinstance(config["patch_size"], list):
        raise CimisError(f"{plans_file}: {where}.n_conv_per_stage_encoder and patch_size must be lists")
    if len(config["patch_size"]) != 3:
        raise CimisError(f"{plans_file}: {where}.patch_size has {len(config['patch_size'])} axes; only 3D "
                         f"configurations can be imported")
    n_stages = len(config["n_conv_per_stage_encoder"])
    if not 2 <= n_stages <= MAX_LEVELS:
        raise CimisError(f"{plans_file}: {where}.n_conv_per_stage_encoder must list 2 to {MAX_LEVELS} stages")
    base, most = config["UNet_base_num_features"], config["unet_max_num_features"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_FILTERS for v in (base, most)):
        raise CimisError(f"{plans_file}: {where}.UNet_base_num_features and unet_max_num_features must be "
                         f"integers from 1 to {MAX_FILTERS}")
    blocks_key = "n_conv_per_stage" if builder == "nnunet.PlainConvUNet" else "n_blocks_per_stage"
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": [min(base * 2**i, most) for i in range(n_stages)],
        "conv_op": "Conv3d",
        "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        blocks_key: config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": "InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    _check_arch_kwargs(builder, kwargs, f"{plans_file}: {where}")
    return builder, kwargs


def _check_arch_kwargs(builder: str, kwargs: Any, where: str) -> None:
    """Raise :class:`CimisError` unless ``kwargs`` are plain, bounded arguments of ``builder``'s network.

    They come from plans.json or, later, a model card anyone can hand over; their values size what gets
    allocated, so they are checked before anything is built.
    """
    if not isinstance(kwargs, dict):
        raise CimisError(f"{where}: the network arguments must be an object")
    unknown = set(kwargs) - _ARCH_KEYS[builder]
    if unknown:
        raise CimisError(f"{where}: unknown network arguments {sorted(unknown)} for {builder.split('.')[1]}")
    missing = _REQUIRED_KEYS[builder] - set(kwargs)
    if missing:
        raise CimisError(f"{where}: network arguments {sorted(missing)} missing")
    n = kwargs["n_stages"]
    if not _int_in(n, 2, MAX_LEVELS):
        raise CimisError(f"{where}.n_stages must be an integer from 2 to {MAX_LEVELS}")
    per_stage = {"features_per_stage": (n, 1, MAX_FILTERS), "n_conv_per_stage": (n, 1, _MAX_BLOCKS),
                 "n_blocks_per_stage": (n, 1, _MAX_BLOCKS), "n_conv_per_stage_decoder": (n - 1, 1, _MAX_BLOCKS),
                 "bottleneck_channels": (n, 1, MAX_FILTERS)}
    for key, (length, low, high) in per_stage.items():
        value = kwargs.get(key)
        if value is None and key not in _REQUIRED_KEYS[builder]:  # absent, or bottleneck_channels' default
            continue
        if not (isinstance(value, list) and len(value) == length and all(_int_in(v, low, high) for v in value)):
            raise CimisError(f"{where}.{key} must be a list of {length} integers from {low} to {high}")
    for key, high in (("kernel_sizes", MAX_KERNEL), ("strides", MAX_STRIDE)):
        value = kwargs[key]
        if not (isinstance(value, list) and len(value) == n and all(
                isinstance(v, list) and len(v) == 3 and all(_int_in(x, 1, high) for x in v) for v in value)):
            raise CimisError(f"{where}.{key} must be a list of {n} triples of integers from 1 to {high}")
    if kwargs.get("stem_channels") is not None and not _int_in(kwargs["stem_channels"], 1, MAX_FILTERS):
        raise CimisError(f"{where}.stem_channels must be an integer from 1 to {MAX_FILTERS}")
    for key in ("conv_bias", "nonlin_first"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise CimisError(f"{where}.{key} must be true or false")
    for key, table in _OP_NAMES.items():
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, str) or value not in table.values()):
            raise CimisError(f"{where}.{key} is {str(value)[:60]!r}, not one of {', '.join(sorted(set(table.values())))}")
    if kwargs["conv_op"] is None:
        raise CimisError(f"{where}.conv_op must be Conv3d")
    for key, allowed in _OP_KWARGS.items():
        value = kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not set(value) <= set(allowed):
            raise CimisError(f"{where}.{key} must be an object with keys among {', '.join(allowed)}")
        for name, kind in allowed.items():
            if name in value and not (isinstance(value[name], bool) if kind is bool else _finite(value[name])):
                raise CimisError(f"{where}.{key}.{name} must be {'true or false' if kind is bool else 'a number'}")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------- axes, preprocessing
def _network_axes(plans: dict, plans_file: Path) -> list[int]:
    """For each spatial axis of the network's input, the axis of our ``(x, y, z)`` arrays it reads.

    nnU-Net's array is SimpleITK's ``(z, y, x)`` (our axes reversed), transposed by ``transpose_forward``:
    network axis k is numpy axis ``transpose_forward[k]``, i.e. our axis ``2 - transpose_forward[k]``.
    """
    transpose = plans.get("transpose_forward", [0, 1, 2])
    if not (isinstance(transpose, list) and sorted(transpose) == [0, 1, 2]
            and all(_int_in(t, 0, 2) for t in transpose)):
        raise CimisError(f"{plans_file}: transpose_forward must be a permutation of [0, 1, 2]")
    return [2 - t for t in transpose]


def _in_our_order(values: list, network_axes: list[int]) -> list:
    """Per-axis values given in the network's axis order, reordered to ``(x, y, z)``."""
    ours = [None, None, None]
    for k, axis in enumerate(network_axes):
        ours[axis] = values[k]
    return ours


def _numbers(value: Any, plans_file: Path, key: str, low: float, high: float) -> list[float]:
    if not (isinstance(value, list) and len(value) == 3 and all(_finite(v) and low <= v <= high for v in value)):
        raise CimisError(f"{plans_file}: {key} must be three numbers from {low} to {high} "
                         f"(only 3D configurations can be imported)")
    return [float(v) for v in value]


def _ints(value: Any, plans_file: Path, key: str, low: int, high: int) -> list[int]:
    if not (isinstance(value, list) and len(value) == 3 and all(_int_in(v, low, high) for v in value)):
        raise CimisError(f"{plans_file}: {key} must be three integers from {low} to {high} "
                         f"(only 3D configurations can be imported)")
    return list(value)


def _normalization(plans: dict, config: dict, plans_file: Path, where: str) -> dict:
    """nnU-Net's CTNormalization (clip to the foreground's 0.5 / 99.5 percentiles, subtract the mean,
    divide by the standard deviation) as ``{"kind": "clip_zscore", ...}``.

    The other schemes normalise each image by its own statistics (ZScoreNormalization, RescaleTo01) or
    are not CT (RGBTo01); they cannot be written as fixed numbers and are refused.
    """
    schemes = config.get("normalization_schemes")
    if not (isinstance(schemes, list) and len(schemes) == 1):
        raise CimisError(f"{plans_file}: {where}.normalization_schemes must list one scheme (one CT channel)")
    if schemes[0] != "CTNormalization":
        raise CimisError(f"{plans_file}: {where}.normalization_schemes is {str(schemes[0])[:60]!r}; only "
                         f"CTNormalization (fixed intensity statistics) can be imported, as other schemes "
                         f"normalise each image by its own statistics")
    properties = plans.get("foreground_intensity_properties_per_channel",
                           plans.get("foreground_intensity_properties_by_modality"))
    stats = properties.get("0") if isinstance(properties, dict) else None
    key = "foreground_intensity_properties_per_channel.0"
    if not isinstance(stats, dict):
        raise CimisError(f"{plans_file}: {key} missing (CTNormalization needs it)")
    for name in ("percentile_00_5", "percentile_99_5", "mean", "std"):
        if not _finite(stats.get(name)):
            raise CimisError(f"{plans_file}: {key}.{name} must be a number")
    low, high = float(stats["percentile_00_5"]), float(stats["percentile_99_5"])
    if low > high:
        raise CimisError(f"{plans_file}: {key}.percentile_00_5 is above percentile_99_5")
    # nnU-Net divides by max(std, 1e-8).
    return {"kind": "clip_zscore", "clip": [low, high], "mean": float(stats["mean"]),
            "std": max(float(stats["std"]), 1e-8)}


def _orientation(plans: dict, notes: list[str]) -> str:
    """``""`` (nnU-Net feeds the voxel grid as stored), except where the image is reoriented to RAS first:
    nnU-Net's NibabelIOWithReorient reader, and TotalSegmentator, which reorients every image to the
    closest canonical (RAS) orientation before calling nnU-Net."""
    if plans.get("image_reader_writer") == "NibabelIOWithReorient":
        notes.append("the plans' image reader reorients to RAS; so does CIMISLearner for this model")
        return "RAS"
    if "totalsegmentator" in str(plans.get("dataset_name", "")).lower():
        notes.append("TotalSegmentator reorients images to RAS before nnU-Net; so does CIMISLearner for this model")
        return "RAS"
    return ""


# ========================================================================================== building
class NnUNetInOurAxes(nn.Module):
    """An nnU-Net network that takes and returns tensors in CIMISLearner's axis order.

    Our preprocessing gives ``(B, C, X, Y, Z)`` (SimpleITK's array transposed); nnU-Net's networks were
    trained on ``(B, C, Z, Y, X)`` (SimpleITK's array, possibly transposed again by the plans'
    ``transpose_forward``). Their kernels and strides are per axis (anisotropic CT), so the axes must match.
    Permuting the tensors, rather than the weights, keeps the source's state dict and arguments exactly as
    nnU-Net wrote them, so a grown model can go back to nnU-Net unchanged.

    Args:
        network: the dynamic_network_architectures network (``deep_supervision=False``).
        network_axes: for each spatial axis of the network's input, the axis of ``(X, Y, Z)`` it reads.
    """

    def __init__(self, network: nn.Module, network_axes: list[int]):
        super().__init__()
        self.network = network
        self.to_network = (0, 1) + tuple(2 + a for a in network_axes)
        back = [0, 0, 0]
        for k, a in enumerate(network_axes):
            back[a] = k
        self.from_network = (0, 1) + tuple(2 + k for k in back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B, K, X, Y, Z)``: the network's logits (or the features F, where its final
        convolution has been replaced)."""
        # A plain tensor (MONAI's MetaTensor would track metadata through every layer) and a contiguous
        # copy (PyTorch's CPU convolutions and instance norms take a slow path on permuted views).
        x = x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
        out = self.network(x.permute(self.to_network).contiguous())
        return out.permute(self.from_network).contiguous()


def build_network(builder: str, args: dict) -> nn.Module:
    """Build an nnU-Net network from plain JSON arguments (as :func:`read_nnunet` gives and the card stores).

    Args:
        builder: ``"nnunet.PlainConvUNet"`` or ``"nnunet.ResidualEncoderUNet"``.
        args: the constructor's keyword arguments (ops by short name, e.g. ``"conv_op": "Conv3d"``) with
            ``input_channels`` (1) and ``num_classes``, plus ``network_axes``, the order of our axes along the
            network's (see :class:`NnUNetInOurAxes`).

    Returns:
        a :class:`NnUNetInOurAxes` around the network, deep supervision off, randomly initialised.
    """
    if builder not in BUILDERS:
        raise CimisError(f"unknown nnU-Net network {str(builder)[:60]!r} (known: {', '.join(BUILDERS)})")
    if not isinstance(args, dict):
        raise CimisError("the nnU-Net network arguments must be an object")
    kwargs = dict(args)
    input_channels = kwargs.pop("input_channels", None)
    num_classes = kwargs.pop("num_classes", None)
    axes = kwargs.pop("network_axes", None)
    if kwargs.pop("deep_supervision", False) is not False:
        raise CimisError("the nnU-Net network's deep_supervision must be false")
    if input_channels != 1 or isinstance(input_channels, bool):
        raise CimisError("the nnU-Net network's input_channels must be 1 (a CT volume has one channel)")
    if not _int_in(num_classes, 2, MAX_CLASSES + 1):
        raise CimisError(f"the nnU-Net network's num_classes must be an integer from 2 to {MAX_CLASSES + 1}")
    if not (isinstance(axes, list) and sorted(axes) == [0, 1, 2] and all(_int_in(a, 0, 2) for a in axes)):
        raise CimisError("the nnU-Net network's network_axes must be a permutation of [0, 1, 2]")
    _check_arch_kwargs(builder, kwargs, "the nnU-Net network arguments")
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
        from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
    except ImportError:
        raise CimisError("nnU-Net models need the package dynamic_network_architectures", _INSTALL_HINT) from None
    ops = {"Conv3d": nn.Conv3d, "InstanceNorm3d": nn.InstanceNorm3d, "BatchNorm3d": nn.BatchNorm3d,
           "Dropout3d": nn.Dropout3d, "Dropout": nn.Dropout, "LeakyReLU": nn.LeakyReLU, "ReLU": nn.ReLU,
           "PReLU": nn.PReLU, "ELU": nn.ELU, "GELU": nn.GELU, "BasicBlockD": BasicBlockD, "BottleneckD": BottleneckD}
    built = {k: (ops[v] if k in _OP_NAMES and v is not None else v) for k, v in kwargs.items()}
    network_class = PlainConvUNet if builder == "nnunet.PlainConvUNet" else ResidualEncoderUNet
    try:
        network = network_class(input_channels=1, num_classes=num_classes, deep_supervision=False, **built)
    except (AssertionError, TypeError, ValueError) as exc:
        raise CimisError(f"the nnU-Net network arguments do not build a {builder.split('.')[1]} "
                         f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    return NnUNetInOurAxes(network, axes)


def size_divisor(args: dict) -> list[int]:
    """Input sizes must be multiples of this per axis of ``(X, Y, Z)``: the product of the strides, which
    nnU-Net's plans give in the network's axis order (often anisotropic, so the order matters)."""
    divisor = [1, 1, 1]
    for stride in args["strides"]:
        for k, axis in enumerate(args["network_axes"]):
            divisor[axis] *= int(stride[k])
    return divisor


def check_state_dict(network: nn.Module, state_dict: dict[str, torch.Tensor], checkpoint: Path,
                     hint: str | None = None) -> None:
    """Raise one :class:`CimisError` naming ``checkpoint`` unless ``state_dict`` has exactly the network's
    parameter and buffer names, with the same shapes."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (first: {wrong[0]})")
    if problems:
        raise CimisError(f"{checkpoint}: the weights do not match the network of plans.json and dataset.json: "
                         f"{'; '.join(problems)}", hint)
