"""Read a MONAI bundle folder AS DATA: network, weights, classes and preprocessing, nothing evaluated.

A bundle (MONAI Model Zoo, Auto3DSeg, MONAI Label) is::

    configs/metadata.json           network_data_format.outputs.<key>.channel_def: {"0": "background", ...}
    configs/inference.json | .yaml  network_def {_target_: SegResNet, ...}, preprocessing transforms, inferer
    models/model.pt | model.safetensors

MONAI's own ConfigParser evaluates ``$`` expressions and instantiates ``_target_`` entries, which runs
Python from the bundle. Here the configs are read with ``json`` or ``yaml.safe_load`` and only literal
values are used: a plain ``@key`` reference is followed to the literal it names; a value given only as an
expression (``$...``) or a macro (``%...``) is refused with one line naming the file, the key and the
command-line option that supplies it. ``_target_`` names are looked up in a fixed table of networks, never
imported. ``model.pt`` is read with ``torch.load(weights_only=True)``, which refuses every pickle that is
not plain tensors and containers (a ``__reduce__`` payload is never run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from cimis.errors import CimisError
from cimis.model.imported import MONAI_FINAL_CONV
from cimis.model.imported_limits import MONAI_BUILDERS, check_imported_args, monai_size_divisor
from cimis.model.source_model import SourceModel

CONFIG_LIMIT = 16 * 2**20
MAX_REFERENCE_DEPTH = 32
NETWORK_KEYS = ("network_def", "network")
NETWORK_NAMES = {key.split(".", 1)[1]: key for key in MONAI_BUILDERS}
# Networks of MONAI's zoo that are not supported, named so the refusal says so.
KNOWN_UNSUPPORTED = ("BasicUNet", "AttentionUnet", "VNet", "HighResNet", "SegResNetDS", "SegResNetVAE", "UNet++",
                     "BasicUNetPlusPlus", "SwinUNETRv2", "DiNTS", "TopologySearch")
# Transforms that change intensities in a way the model card cannot express.
UNSUPPORTED_INTENSITY = ("NormalizeIntensityd", "ScaleIntensityd", "ScaleIntensityRangePercentilesd",
                         "ThresholdIntensityd", "ClipIntensityPercentilesd", "HistogramNormalized")
_EXPRESSION = re.compile(r"^\s*[$%]")
# The one expression recognised (as text, never evaluated): a network followed by a 1x1x1 convolution, as
# `cimis export` writes networks without a final 1x1x1 convolution (UNet).
_SEQUENTIAL = re.compile(r"^\$torch\.nn\.Sequential\(@([A-Za-z_][A-Za-z0-9_]*),\s*@([A-Za-z_][A-Za-z0-9_]*)\)$")


class BundleOverrides:
    """Values the command line supplies where the bundle gives only expressions (or nothing)."""

    def __init__(self, spacing=None, window=None, intensity_range=None, patch_size=None, classes=None):
        self.spacing, self.window, self.intensity_range = spacing, window, intensity_range
        self.patch_size, self.classes = patch_size, classes
        self.classes_named = False  # set when --classes named the channels (the metadata has no names)


def is_bundle(folder: Path) -> bool:
    return (folder / "configs").is_dir()


class _NoAliasLoader:
    """``yaml.SafeLoader`` without aliases: an alias bomb (a billion laughs) cannot expand here."""

    @staticmethod
    def load(path: Path, text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    raise CimisError(f"{path} uses YAML aliases (*name), which are not read here",
                                     "write the values out in full")
                return super().compose_node(parent, index)

        try:
            return yaml.load(text, Loader=Loader)  # noqa: S506 -- a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise CimisError(f"{path} is not valid YAML ({str(exc)[:200]})") from None


def read_config(path: Path) -> dict:
    """A bundle config file as plain data (JSON or YAML, nothing evaluated)."""
    if path.stat().st_size > CONFIG_LIMIT:
        raise CimisError(f"{path} is too large to be a bundle config ({path.stat().st_size} bytes)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CimisError(f"{path} cannot be read as text ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        data = _NoAliasLoader.load(path, text)
    else:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CimisError(f"{path} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CimisError(f"{path} does not hold a config object")
    return data


class Config:
    """One config file's data with MONAI's plain references (``@key``, ``@a::b::0``) resolved to literals."""

    def __init__(self, path: Path, data: dict, root: Path):
        self.path, self.data, self.root = path, data, root

    @property
    def name(self) -> str:
        return str(self.path.relative_to(self.root)) if self.path.is_relative_to(self.root) else str(self.path)

    def lookup(self, key: str, depth: int = 0) -> Any:
        """The raw value at ``key`` (``a::b::0``; MONAI's older ``#`` separator too), or KeyError."""
        value: Any = self.data
        for part in re.split(r"::|#", key):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise KeyError(key)
        return value

    def literal(self, value: Any, key: str, option: str | None, depth: int = 0) -> Any:
        """``value`` with every ``@key`` reference followed; an expression raises a one-line error naming
        ``key`` and the command-line ``option`` that supplies the value."""
        if depth > MAX_REFERENCE_DEPTH:
            raise CimisError(f"{self.name}: {key} refers through more than {MAX_REFERENCE_DEPTH} references (a cycle?)")
        if isinstance(value, str):
            if _EXPRESSION.match(value):
                hint = f"give the value with {option}" if option else "this value must be a literal in the config"
                raise CimisError(f"{self.name}: {key} is given as an expression ({value.strip()[:80]!r}), "
                                 "which CIMISLearner never evaluates", hint)
            if value.startswith("@"):
                target = value[1:]
                try:
                    raw = self.lookup(target)
                except KeyError:
                    raise CimisError(f"{self.name}: {key} refers to {value!r}, which the config does not define") from None
                return self.literal(raw, f"{key} (-> {target})", option, depth + 1)
            return value
        if isinstance(value, list):
            return [self.literal(v, f"{key}::{i}", option, depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.literal(v, f"{key}::{k}", option, depth + 1) for k, v in value.items()}
        return value

    def get(self, key: str, option: str | None) -> Any:
        return self.literal(self.lookup(key), key, option)


# ------------------------------------------------------------------------------------------ reading
def read_monai_bundle(folder: Path, overrides: BundleOverrides | None = None) -> SourceModel:
    """The bundle's network, weights, classes and preprocessing as a :class:`SourceModel`."""
    folder = Path(folder)
    overrides = overrides or BundleOverrides()
    configs = folder / "configs"
    metadata_path = configs / "metadata.json"
    if not metadata_path.is_file():
        raise CimisError(f"{folder} is not a complete MONAI bundle: configs/metadata.json is missing")
    inference_path = next((configs / n for n in ("inference.json", "inference.yaml", "inference.yml")
                           if (configs / n).is_file()), None)
    if inference_path is None:
        raise CimisError(f"{folder} is not a complete MONAI bundle: configs/inference.json (or .yaml) is missing")
    metadata = Config(metadata_path, read_config(metadata_path), folder)
    inference = Config(inference_path, read_config(inference_path), folder)
    notes: list[str] = []

    head_key = None
    sequential = _SEQUENTIAL.match(str(inference.data.get("network_def", "")))
    if sequential:
        builder, args, network_key = _network(inference, sequential.group(1))
        head_key = _head_conv(inference, sequential.group(2), args)
    else:
        builder, args, network_key = _network(inference)
    final_conv = MONAI_FINAL_CONV[builder]
    out_channels = args.get("out_channels")
    if head_key is not None:
        out_channels = inference.data[head_key]["out_channels"]
    class_names, label_values = _class_names(metadata, out_channels, overrides, notes)
    spacing, orientation, normalization = _preprocessing(inference, overrides, notes)
    patch_size = _patch_size(inference, builder, args, overrides)
    divisor = monai_size_divisor(builder, args)
    if any(p % d for p, d in zip(patch_size, divisor)):
        raise CimisError(f"{inference.name}: the sliding-window size {patch_size} is not a multiple of the network's "
                         f"total stride {divisor}", "give a fitting size with --patch-size")
    state_dict = _weights(folder)
    head = None
    if head_key is not None:
        if builder != "monai.UNet":
            raise CimisError(f"{inference.name}: network_def adds a 1x1x1 convolution to {builder}, which has its own",
                             "only a UNet is followed by one")
        try:
            head = (state_dict.pop("1.weight"), state_dict.pop("1.bias"))
        except KeyError:
            raise CimisError(f"{folder}: the weights lack '1.weight' and '1.bias' of network_def's second part") from None
        state_dict = {k[2:] if k.startswith("0.") else k: v for k, v in state_dict.items()}
    return SourceModel(
        kind="monai-bundle", builder=builder, args=args, state_dict=state_dict, final_conv=final_conv,
        class_names=class_names, label_values=label_values, spacing=spacing,
        patch_size=patch_size, orientation=orientation, normalization=normalization, notes=notes, head=head,
    )


def bundle_class_names(folder: Path) -> list[str]:
    """The bundle's class names after background, in channel order, from configs/metadata.json alone (no
    weights read): what a class chooser offers. Raises when the metadata names no channels."""
    metadata_path = Path(folder) / "configs" / "metadata.json"
    if not metadata_path.is_file():
        raise CimisError(f"{folder} is not a complete MONAI bundle: configs/metadata.json is missing")
    metadata = Config(metadata_path, read_config(metadata_path), Path(folder))
    return _channel_names(metadata, None, BundleOverrides(), [])

def _head_conv(inference: Config, key: str, network_args: dict) -> str:
    """Check the 1x1x1 ``torch.nn.Conv3d`` entry ``key`` that follows the network; returns the key."""
    spec = inference.data.get(key)
    if not isinstance(spec, dict) or spec.get("_target_") not in ("torch.nn.Conv3d", "Conv3d"):
        raise CimisError(f"{inference.name}: {key} (the second part of network_def) is not a torch.nn.Conv3d")
    values = {k: inference.literal(spec.get(k), f"{key}::{k}", None) for k in ("in_channels", "out_channels", "kernel_size")}
    if values["kernel_size"] not in (1, [1, 1, 1]) or values["in_channels"] != network_args.get("out_channels") \
            or not isinstance(values["out_channels"], int) or not 2 <= values["out_channels"] <= 1001:
        raise CimisError(f"{inference.name}: {key} must be a 1x1x1 Conv3d from the network's "
                         f"{network_args.get('out_channels')} output channels to the classes")
    return key


def _network(inference: Config, key: str | None = None) -> tuple[str, dict, str]:
    if key is None:
        key = next((k for k in NETWORK_KEYS if isinstance(inference.data.get(k), (dict, str))
                    and _is_network(inference, k)), None)
    if key is None or not isinstance(inference.data.get(key), (dict, str)):
        raise CimisError(f"{inference.name}: no network_def with a _target_ network found",
                         "the bundle must define its network as {\"_target_\": \"SegResNet\", ...}")
    raw = inference.data[key]
    spec = inference.literal(raw, key, None) if isinstance(raw, str) else raw
    target = spec.get("_target_")
    if not isinstance(target, str) or _EXPRESSION.match(target):
        raise CimisError(f"{inference.name}: {key}::_target_ is not a network name")
    name = target.rsplit(".", 1)[-1]
    prefix = target.rsplit(".", 1)[0] if "." in target else ""
    if name not in NETWORK_NAMES or (prefix and not prefix.startswith("monai.networks.nets")):
        supported = ", ".join(NETWORK_NAMES)
        known = f" ({name} is not supported)" if name in KNOWN_UNSUPPORTED else ""
        raise CimisError(f"{inference.name}: {key}::_target_ is {target!r}, not a supported network{known}",
                         f"supported: MONAI's {supported}")
    builder = NETWORK_NAMES[name]
    args = {}
    for arg, value in spec.items():
        if arg.startswith("_") and arg.endswith("_"):
            continue  # _target_, _requires_, _disabled_, _desc_, _mode_
        args[arg] = inference.literal(value, f"{key}::{arg}", None)
    if builder == "monai.SwinUNETR":
        args.pop("img_size", None)  # deprecated in MONAI 1.3, removed since: any size divisible by 32
    if builder == "monai.DynUNet":
        args["deep_supervision"] = False
    if builder == "monai.SegResNet":
        args.pop("use_conv_final", None)
    check_imported_args(builder, args, str(inference.path), field=f"{key}",
                        hint=f"CIMISLearner imports {name} with arguments within generous bounds of real CT models")
    return builder, args, key


def _is_network(inference: Config, key: str) -> bool:
    raw = inference.data[key]
    if isinstance(raw, str):
        if not raw.startswith("@"):
            return False
        try:
            raw = inference.lookup(raw[1:])
        except KeyError:
            return False
    return isinstance(raw, dict) and "_target_" in raw


def _class_names(metadata: Config, out_channels: Any, overrides: BundleOverrides,
                 notes: list[str]) -> tuple[list[str], list[int]]:
    """Class names in channel order and their label values: the channel numbers, or the output's
    ``label_values`` {name: value} where the bundle gives them (bundles written by ``cimis export``)."""
    names = _channel_names(metadata, out_channels, overrides, notes)
    values = list(range(1, len(names) + 1))
    try:
        outputs = metadata.lookup("network_data_format::outputs")
        given = next((o.get("label_values") for o in outputs.values() if isinstance(o, dict) and "label_values" in o), None)
    except (KeyError, AttributeError):
        given = None
    if isinstance(given, dict) and set(given) == set(names) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535 for v in given.values()) \
            and len(set(given.values())) == len(names):
        values = [given[n] for n in names]
    return names, values


def _channel_names(metadata: Config, out_channels: Any, overrides: BundleOverrides, notes: list[str]) -> list[str]:
    try:
        outputs = metadata.lookup("network_data_format::outputs")
    except KeyError:
        outputs = None
    channel_def = None
    where = "network_data_format::outputs"
    if isinstance(outputs, dict):
        for name, spec in outputs.items():
            if isinstance(spec, dict) and isinstance(spec.get("channel_def"), dict):
                channel_def, where = spec["channel_def"], f"network_data_format::outputs::{name}::channel_def"
                break
    if channel_def is None:
        if overrides.classes and isinstance(out_channels, int) and len(overrides.classes) == out_channels - 1:
            notes.append("class names from --classes (the bundle's metadata has no channel_def)")
            overrides.classes_named = True
            return list(overrides.classes)
        raise CimisError(f"{metadata.name}: {where} has no channel_def naming the output channels",
                         f"name the {out_channels - 1 if isinstance(out_channels, int) else ''} classes after "
                         "background, in channel order, with --classes")
    names: dict[int, str] = {}
    for index, value in channel_def.items():
        if not str(index).isdigit() or not isinstance(value, str) or not value.strip() or len(value) > 256:
            raise CimisError(f"{metadata.name}: {where}::{index} must map a channel number to a class name")
        names[int(index)] = value.strip()
    if isinstance(out_channels, int) and sorted(names) != list(range(out_channels)):
        raise CimisError(f"{metadata.name}: {where} names channels {sorted(names)[:20]}, but the network has "
                         f"{out_channels} output channels")
    if len(names) < 2:
        raise CimisError(f"{metadata.name}: {where} names no class besides background")
    if len(set(n.lower() for n in names.values())) != len(names):
        raise CimisError(f"{metadata.name}: {where} names a class twice")
    if names[0].lower() not in ("background", "_background_", "bg"):
        notes.append(f"channel 0 ({names[0]!r}) is taken as the background")
    return [names[i] for i in range(1, len(names))]


def _transforms(inference: Config) -> list[tuple[str, dict, str]]:
    """``(name, spec, key)`` of each preprocessing transform, expressions left unresolved."""
    for key in ("preprocessing", "pre_transforms", "transforms"):
        raw = inference.data.get(key)
        if isinstance(raw, str) and raw.startswith("@"):
            try:
                raw = inference.lookup(raw[1:])
            except KeyError:
                raw = None
        if isinstance(raw, dict) and isinstance(raw.get("transforms"), list):
            raw, key = raw["transforms"], f"{key}::transforms"
        if isinstance(raw, list):
            found = []
            for i, t in enumerate(raw):
                if isinstance(t, str) and t.startswith("@"):
                    try:
                        t = inference.lookup(t[1:])
                    except KeyError:
                        continue
                if isinstance(t, dict) and isinstance(t.get("_target_"), str):
                    found.append((t["_target_"].rsplit(".", 1)[-1], t, f"{key}::{i}"))
            return found
    return []


def _preprocessing(inference: Config, overrides: BundleOverrides, notes: list[str]):
    spacing = orientation = window = value_range = None
    clip = True
    for name, spec, key in _transforms(inference):
        if name == "Spacingd" and overrides.spacing is None:
            spacing = inference.literal(spec.get("pixdim"), f"{key}::pixdim", "--spacing")
        elif name == "Orientationd":
            orientation = inference.literal(spec.get("axcodes", "RAS"), f"{key}::axcodes", None)
        elif name == "ScaleIntensityRanged" and overrides.window is None:
            values = [inference.literal(spec.get(k), f"{key}::{k}", "--window")
                      for k in ("a_min", "a_max", "b_min", "b_max")]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise CimisError(f"{inference.name}: {key} needs numbers a_min, a_max, b_min and b_max",
                                 "give the window with --window")
            window, value_range = [float(values[0]), float(values[1])], [float(values[2]), float(values[3])]
            clip = inference.literal(spec.get("clip", False), f"{key}::clip", None)
        elif name in UNSUPPORTED_INTENSITY and overrides.window is None:
            raise CimisError(f"{inference.name}: {key} normalises intensities with {name}, by each image's own "
                             "statistics, which CIMISLearner does not support (it maps CT values with a fixed window)",
                             "give the fixed mapping closest to it with --window=LOW,HIGH and --intensity-range=B0,B1, "
                             "e.g. --window=-1024,3071 --intensity-range=-1,1 for NormalizeIntensityd + "
                             "ScaleIntensityd(minv=-1, maxv=1) on CTs spanning -1024..3071 HU")
    if overrides.spacing is not None:
        spacing = list(overrides.spacing)
    if spacing is None:
        raise CimisError(f"{inference.name}: the preprocessing has no Spacingd with pixdim", "give the spacing with --spacing")
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        spacing = [float(spacing)] * 3
    if (not isinstance(spacing, list) or len(spacing) != 3
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.01 <= s <= 100 for s in spacing)):
        raise CimisError(f"{inference.name}: Spacingd's pixdim {str(spacing)[:60]} is not three spacings in mm",
                         "give the spacing with --spacing")
    if overrides.window is not None:
        window, value_range = list(overrides.window), list(overrides.intensity_range or [0.0, 1.0])
    if window is None:
        raise CimisError(f"{inference.name}: the preprocessing has no ScaleIntensityRanged (the CT window)",
                         "give the window with --window LOW,HIGH (and --intensity-range)")
    if clip is not True and overrides.window is None:
        notes.append("the bundle's ScaleIntensityRanged does not clip; CIMISLearner clips to the window")
    if orientation is None:
        orientation = ""
        notes.append("the bundle does not reorient (no Orientationd): neither does the imported model")
    if not isinstance(orientation, str) or (orientation and len(orientation) != 3):
        raise CimisError(f"{inference.name}: Orientationd's axcodes {str(orientation)[:20]!r} is not an axis code like RAS")
    return ([float(s) for s in spacing], orientation.upper(),
            {"kind": "window", "window": window, "range": value_range})


def _patch_size(inference: Config, builder: str, args: dict, overrides: BundleOverrides) -> list[int]:
    if overrides.patch_size is not None:
        return list(overrides.patch_size)
    roi, key = None, None
    for name in ("inferer", "sw_inferer"):
        spec = inference.data.get(name)
        if isinstance(spec, str) and spec.startswith("@"):
            spec = inference.get(name, "--patch-size")
        if isinstance(spec, dict) and "roi_size" in spec:
            roi, key = spec["roi_size"], f"{name}::roi_size"
            break
    if roi is None and builder == "monai.UNETR":
        return list(args["img_size"])
    if roi is None:
        raise CimisError(f"{inference.name}: no inferer with a roi_size (the sliding-window size)",
                         "give it with --patch-size")
    roi = inference.literal(roi, key, "--patch-size")
    if isinstance(roi, int) and not isinstance(roi, bool):
        roi = [roi] * 3
    if not isinstance(roi, list) or len(roi) != 3 or not all(isinstance(r, int) and not isinstance(r, bool)
                                                           and 1 <= r <= 1024 for r in roi):
        raise CimisError(f"{inference.name}: {key} {str(roi)[:60]} is not three sizes in voxels", "give it with --patch-size")
    if builder == "monai.UNETR" and roi != list(args["img_size"]):
        raise CimisError(f"{inference.name}: {key} {roi} differs from UNETR's img_size {args['img_size']}",
                         "UNETR only runs on windows of its img_size")
    return roi


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    models = folder / "models"
    safetensors_path, pickle_path = models / "model.safetensors", models / "model.pt"
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CimisError(f"{safetensors_path} cannot be read as safetensors ({str(exc)[:200]})") from None
    if pickle_path.is_file():
        return load_state_dict_file(pickle_path)
    if (models / "model.ts").is_file():
        raise CimisError(f"{folder}: models/ holds only model.ts, a TorchScript program, which is never run",
                         "the bundle must hold models/model.pt (a state dict) or models/model.safetensors")
    raise CimisError(f"{folder} is not a complete MONAI bundle: models/model.pt (or model.safetensors) is missing")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint read with ``weights_only=True`` (plain tensors and containers only); a state
    dict or one under ``model`` / ``state_dict`` / ``network`` (MONAI Label, Auto3DSeg), ``module.`` prefixes
    (DistributedDataParallel) removed."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols is not for the user
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        lines = str(exc).splitlines()
        reason = next((l.strip() for l in lines if "Unsupported" in l or "GLOBAL" in l), lines[0] if lines else "")
        raise CimisError(f"{path} is not a plain PyTorch state dict: it holds objects that only a full unpickling "
                         f"would rebuild, which can run code, so it is refused ({reason[:160]})",
                         "save the weights as a plain state dict (torch.save(net.state_dict())) or as safetensors") from None
    state = loaded
    if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = next((loaded[k] for k in ("model", "state_dict", "network", "net") if isinstance(loaded.get(k), dict)), None)
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                             for k, v in state.items()):
        raise CimisError(f"{path} holds no state dict of tensors (top-level keys: {list(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
