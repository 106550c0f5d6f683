"""Bounds on every field of a model card, checked before anything is built from it (no torch here).

A card is read from files anyone can hand over (a registry import, a model folder). Its fields size what
gets allocated (network channels and levels, number of classes, patch size), so a field of the wrong type
or an absurd value must be refused with one line naming the file and the field, never reach a library
(one card asked for 3.4 PB) or "work" silently (a zero patch size). The bounds are far beyond any real
CT model (nnU-Net's largest plans use 320 channels, 6-7 levels and 100-200 classes).
"""

from __future__ import annotations

import math
from typing import Any

from cimis.errors import CimisError
from cimis.model.imported_limits import IMPORTED_FIELDS, check_imported_network

MAX_CLASSES = 1000
MAX_CLASS_NAME = 256
MAX_LABEL_VALUE = 2**31 - 1
MAX_LEVELS = 8
MAX_FILTERS = 1024
MAX_KERNEL = 7
MAX_STRIDE = 4
MAX_PATCH_AXIS = 1024
MAX_PATCH_VOXELS = 512**3
MAX_RES_UNITS = 8
ARCHITECTURES = ("dynunet", "unet", "imported")
MAX_HU = 1e5
_AXES = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}

_DAMAGED = "the model card is damaged or was not written by CIMISLearner"


def check_card_fields(card: dict, where: str) -> None:
    """Raise :class:`CimisError` ("WHERE: field F ...") unless every field of the card JSON is in bounds."""
    _check_classes(card.get("classes"), where)
    network = card.get("network")
    if not isinstance(network, dict):
        raise _bad(where, "network", "must be an object")
    _check_network(network, where)
    preprocessing = card.get("preprocessing")
    if not isinstance(preprocessing, dict):
        raise _bad(where, "preprocessing", "must be an object")
    _check_preprocessing(preprocessing, network, where)
    for name, kind in (("history", list), ("metrics", dict), ("checksums", dict)):
        if name in card and not isinstance(card[name], kind):
            raise _bad(where, name, f"must be {'a list' if kind is list else 'an object'}")
    checksums = card.get("checksums", {})
    if not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 128 for k, v in checksums.items()):
        raise _bad(where, "checksums", "must map file names to SHA-256 strings")


def _bad(where: str, field: str, problem: str) -> CimisError:
    return CimisError(f"{where}: field {field!r} {problem}", _DAMAGED)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: Any, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


# ------------------------------------------------------------------------------------------ classes
def _check_classes(classes: Any, where: str) -> None:
    if not isinstance(classes, list) or not classes:
        raise _bad(where, "classes", "must be a non-empty list of {name, value, color} objects")
    if len(classes) > MAX_CLASSES:
        raise _bad(where, "classes", f"lists {len(classes)} classes (at most {MAX_CLASSES})")
    for i, entry in enumerate(classes):
        field = f"classes[{i}]"
        if not isinstance(entry, dict):
            raise _bad(where, field, f"is {type(entry).__name__}, not a {{name, value, color}} object")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad(where, f"{field}.name", "must be a non-empty string")
        if len(name) > MAX_CLASS_NAME:
            raise _bad(where, f"{field}.name", f"is {len(name)} characters long (at most {MAX_CLASS_NAME})")
        if not _int_in(entry.get("value"), 1, MAX_LABEL_VALUE):
            raise _bad(where, f"{field}.value", f"must be an integer label value from 1 to {MAX_LABEL_VALUE}")
        color = entry.get("color")
        if color is not None and not (isinstance(color, list) and len(color) in (0, 3)
                                      and all(_int_in(c, 0, 255) for c in color)):
            raise _bad(where, f"{field}.color", "must be three integers from 0 to 255")


# ------------------------------------------------------------------------------------------ network
def _per_axis(value: Any, low: int, high: int) -> bool:
    """An int or three ints in [low, high] (MONAI's kernel and stride entries)."""
    if isinstance(value, list):
        return len(value) == 3 and all(_int_in(v, low, high) for v in value)
    return _int_in(value, low, high)


def _check_network(network: dict, where: str) -> None:
    arch = network.get("arch", "dynunet")
    if arch not in ARCHITECTURES:
        raise _bad(where, "network.arch", f"is {str(arch)[:40]!r} (known: {', '.join(ARCHITECTURES)})")
    if arch == "imported":
        check_imported_network(network, where)
        return
    stray = set(network) & (IMPORTED_FIELDS - {"arch"})
    if stray:
        raise _bad(where, f"network.{sorted(stray)[0]}", f"belongs to imported networks, not to {arch}")
    if network.get("in_channels", 1) != 1 or isinstance(network.get("in_channels", 1), bool):
        raise _bad(where, "network.in_channels", "must be 1 (a CT volume has one channel)")
    filters = network.get("filters", [8, 16, 32, 64])
    if not isinstance(filters, list) or not 2 <= len(filters) <= MAX_LEVELS:
        raise _bad(where, "network.filters", f"must be a list of 2 to {MAX_LEVELS} channel counts")
    if not all(_int_in(f, 1, MAX_FILTERS) for f in filters):
        raise _bad(where, "network.filters", f"must hold integers from 1 to {MAX_FILTERS}")
    for key, high in (("kernel_sizes", MAX_KERNEL), ("strides", MAX_STRIDE)):
        value = network.get(key, [])
        if not isinstance(value, list) or len(value) > MAX_LEVELS or not all(_per_axis(v, 1, high) for v in value):
            raise _bad(where, f"network.{key}", f"must be a list of at most {MAX_LEVELS} integers "
                                                f"(or triples) from 1 to {high}")
    strides = network.get("strides", [1, 2, 2, 2])
    expected = len(filters) if arch == "dynunet" else len(filters) - 1
    if len(strides) != expected or (arch == "dynunet" and len(network.get("kernel_sizes", [3] * expected)) != expected):
        raise _bad(where, "network.strides", f"must have {expected} entries for {len(filters)} levels of {arch}")
    if not isinstance(network.get("norm", "instance"), str) or len(network.get("norm", "")) > 32:
        raise _bad(where, "network.norm", "must be a normalisation name")
    if not isinstance(network.get("res_block", False), bool):
        raise _bad(where, "network.res_block", "must be true or false")
    if not _int_in(network.get("num_res_units", 1), 0, MAX_RES_UNITS):
        raise _bad(where, "network.num_res_units", f"must be an integer from 0 to {MAX_RES_UNITS}")


def size_divisor(strides: list) -> list[int]:
    """The product of the strides per axis (patch sizes must be multiples of it)."""
    divisor = [1, 1, 1]
    for s in strides:
        s3 = s if isinstance(s, list) else [s] * 3
        divisor = [d * int(x) for d, x in zip(divisor, s3)]
    return divisor


# ------------------------------------------------------------------------------------ preprocessing
def _check_preprocessing(pre: dict, network: dict, where: str) -> None:
    spacing = pre.get("spacing", [1.5, 1.5, 2.0])
    if not isinstance(spacing, list) or len(spacing) != 3 or not all(_number_in(s, 0.01, 100.0) for s in spacing):
        raise _bad(where, "preprocessing.spacing", "must be three voxel spacings from 0.01 to 100 mm")
    window = pre.get("window", [-175.0, 250.0])
    if (not isinstance(window, list) or len(window) != 2 or not all(_number_in(w, -1e5, 1e5) for w in window)
            or window[0] >= window[1]):
        raise _bad(where, "preprocessing.window", "must be two HU values, low below high")
    patch = pre.get("patch_size", [96, 96, 96])
    if not isinstance(patch, list) or len(patch) != 3 or not all(_int_in(p, 1, MAX_PATCH_AXIS) for p in patch):
        raise _bad(where, "preprocessing.patch_size", f"must be three sizes from 1 to {MAX_PATCH_AXIS} voxels")
    if patch[0] * patch[1] * patch[2] > MAX_PATCH_VOXELS:
        raise _bad(where, "preprocessing.patch_size", f"{patch} holds more than {MAX_PATCH_VOXELS} voxels")
    if network.get("arch") == "imported":
        divisor = network["divisor"]
    else:
        divisor = size_divisor(network.get("strides", [1, 2, 2, 2]))
    if any(p % d for p, d in zip(patch, divisor)):
        raise _bad(where, "preprocessing.patch_size", f"{patch} is not a multiple of the network's stride {divisor}")
    if not isinstance(pre.get("crop_foreground", True), bool):
        raise _bad(where, "preprocessing.crop_foreground", "must be true or false")
    orientation = pre.get("orientation", "RAS")
    if orientation != "" and (not isinstance(orientation, str) or len(orientation) != 3
                              or sorted(_AXES.get(c, "?") for c in orientation) != ["AP", "LR", "SI"]):
        raise _bad(where, "preprocessing.orientation", "must be an orientation code like RAS (or \"\": keep the file's)")
    if "normalization" in pre:
        check_normalization(pre["normalization"], where, "preprocessing.normalization")


def check_normalization(norm: Any, where: str, field: str) -> None:
    """``{"kind": "window", "window": [lo, hi], "range": [b0, b1]}`` or
    ``{"kind": "clip_zscore", "clip": [lo, hi], "mean": m, "std": s}`` with finite values in bounds."""
    def pair(value, low, high, ordered=True):
        return (isinstance(value, list) and len(value) == 2 and all(_number_in(v, low, high) for v in value)
                and (value[0] < value[1] if ordered else value[0] != value[1]))

    if not isinstance(norm, dict) or norm.get("kind") not in ("window", "clip_zscore"):
        raise _bad(where, f"{field}.kind", "must be 'window' or 'clip_zscore'")
    if norm["kind"] == "window":
        if set(norm) != {"kind", "window", "range"}:
            raise _bad(where, field, "of kind 'window' must hold exactly kind, window and range")
        if not pair(norm["window"], -MAX_HU, MAX_HU):
            raise _bad(where, f"{field}.window", "must be two HU values, low below high")
        if not pair(norm["range"], -1e4, 1e4, ordered=False):
            raise _bad(where, f"{field}.range", "must be two different numbers from -10000 to 10000")
    else:
        if set(norm) != {"kind", "clip", "mean", "std"}:
            raise _bad(where, field, "of kind 'clip_zscore' must hold exactly kind, clip, mean and std")
        if not pair(norm["clip"], -MAX_HU, MAX_HU):
            raise _bad(where, f"{field}.clip", "must be two HU values, low below high")
        if not _number_in(norm["mean"], -MAX_HU, MAX_HU):
            raise _bad(where, f"{field}.mean", "must be a finite HU value")
        if not _number_in(norm["std"], 1e-3, MAX_HU):
            raise _bad(where, f"{field}.std", "must be a positive number from 0.001 to 100000")
