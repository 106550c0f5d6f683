"""Bounds on the card fields of an imported network (plain Python, no torch): builder, args, final_conv, features.

An imported network is rebuilt from a constructor in a fixed table (:mod:`cimis.model.imported`) with the
keyword arguments stored in the card. The card is untrusted input, so every argument is checked here
against a schema per constructor before anything is built: wrong types and absurd sizes are refused with
one line naming the field. Sizes are bounded by the arguments themselves (channels, levels, blocks), not
by building the network: some networks (SwinUNETR) cannot be built on PyTorch's meta device.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from cimis.errors import CimisError

MONAI_BUILDERS = ("monai.SegResNet", "monai.SwinUNETR", "monai.UNet", "monai.DynUNet", "monai.UNETR")
NNUNET_BUILDERS = ("nnunet.PlainConvUNet", "nnunet.ResidualEncoderUNet")
IMPORTED_BUILDERS = MONAI_BUILDERS + NNUNET_BUILDERS
MAX_ARGS_JSON = 64 * 1024
MAX_DEPTH = 6
MAX_CHANNELS = 1024
MAX_OUT_CHANNELS = 1001  # background + the card's class limit
MAX_LEVELS = 8
MAX_BLOCKS = 16
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

_DAMAGED = "the model card is damaged or was not written by CIMISLearner"


def _bad(where: str, field: str, problem: str, hint: str = _DAMAGED) -> CimisError:
    return CimisError(f"{where}: field {field!r} {problem}", hint)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()] + [level + 1])
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value] + [level + 1])
    return level


# ------------------------------------------------------------------------------ value checkers
# Each checker returns None when the value is acceptable, else the problem in words.
Checker = Callable[[Any], "str | None"]


def integer(low: int, high: int) -> Checker:
    return lambda v: None if _is_int(v) and low <= v <= high else f"must be an integer from {low} to {high}"


def number(low: float, high: float) -> Checker:
    return lambda v: (None if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and low <= v <= high else f"must be a number from {low} to {high}")


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def constant(value: Any) -> Checker:
    return lambda v: None if v == value and type(v) is type(value) else f"must be {json.dumps(value)}"


def one_of(*values: str) -> Checker:
    return lambda v: None if isinstance(v, str) and v.lower() in values else f"must be one of {', '.join(values)}"


def optional(check: Checker) -> Checker:
    return lambda v: None if v is None else check(v)


def per_axis(low: int, high: int) -> Checker:
    """An int or three ints (MONAI's kernel, stride and size entries)."""
    def check(v):
        if _is_int(v) and low <= v <= high:
            return None
        if isinstance(v, list) and len(v) == 3 and all(_is_int(x) and low <= x <= high for x in v):
            return None
        return f"must be an integer or three integers from {low} to {high}"
    return check


def int_list(low: int, high: int, min_len: int, max_len: int, item: Checker | None = None) -> Checker:
    item = item or integer(low, high)

    def check(v):
        if not isinstance(v, list) or not min_len <= len(v) <= max_len or any(item(x) for x in v):
            return f"must be a list of {min_len} to {max_len} entries, each of which {item(None) or 'is valid'}"
        return None
    return check


def layer_spec(v: Any) -> str | None:
    """MONAI's layer names: ``"instance"``, or ``["group", {"num_groups": 8}]`` with plain scalar options."""
    text = "must be a layer name or [name, {option: number, string or boolean}]"
    if isinstance(v, str):
        return None if len(v) <= 32 else text
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and len(v[0]) <= 32 and isinstance(v[1], dict):
        if len(v[1]) <= 8 and all(isinstance(k, str) and len(k) <= 32 and (
                isinstance(x, (bool, str)) and len(str(x)) <= 32 or isinstance(x, (int, float)) and math.isfinite(x))
                for k, x in v[1].items()):
            return None
    return text


def dropout(v: Any) -> str | None:
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
        return None
    return layer_spec(v)


def json_plain(v: Any) -> str | None:
    """Anything JSON holds (nnU-Net's class names and keyword dicts), already bounded in size and depth."""
    return None


# ------------------------------------------------------------------------------ the schemas
_COMMON = {"spatial_dims": constant(3), "in_channels": constant(1), "out_channels": integer(1, MAX_OUT_CHANNELS)}
SCHEMAS: dict[str, dict[str, Checker]] = {
    "monai.SegResNet": {
        **_COMMON, "init_filters": integer(1, 256), "dropout_prob": optional(number(0, 1)), "act": layer_spec,
        "norm": layer_spec, "norm_name": layer_spec, "num_groups": integer(1, 256), "use_conv_final": constant(True),
        "blocks_down": int_list(0, MAX_BLOCKS, 1, 6), "blocks_up": int_list(0, MAX_BLOCKS, 0, 5),
        "upsample_mode": one_of("deconv", "nontrainable", "pixelshuffle"),
    },
    "monai.UNet": {
        **_COMMON, "channels": int_list(1, MAX_CHANNELS, 2, MAX_LEVELS), "strides": int_list(1, 4, 1, MAX_LEVELS - 1, per_axis(1, 4)),
        "kernel_size": per_axis(1, 7), "up_kernel_size": per_axis(1, 7), "num_res_units": integer(0, 8),
        "act": layer_spec, "norm": layer_spec, "dropout": dropout, "bias": boolean, "adn_ordering": one_of("nda", "nad", "dna", "dan", "and", "adn", "na", "an", "nd", "dn", "ad", "da", "n", "a", "d", ""),
    },
    "monai.DynUNet": {
        **_COMMON, "kernel_size": int_list(1, 7, 3, MAX_LEVELS, per_axis(1, 7)),
        "strides": int_list(1, 4, 3, MAX_LEVELS, per_axis(1, 4)),
        "upsample_kernel_size": int_list(1, 4, 2, MAX_LEVELS - 1, per_axis(1, 4)),
        "filters": optional(int_list(1, MAX_CHANNELS, 3, MAX_LEVELS)), "dropout": dropout, "norm_name": layer_spec,
        "act_name": layer_spec, "deep_supervision": constant(False), "deep_supr_num": integer(1, MAX_LEVELS),
        "res_block": boolean, "trans_bias": boolean,
    },
    "monai.UNETR": {
        **_COMMON, "img_size": int_list(16, 512, 3, 3, integer(16, 512)), "feature_size": integer(1, 128),
        "hidden_size": integer(1, 1536), "mlp_dim": integer(1, 6144), "num_heads": integer(1, 32),
        "proj_type": one_of("conv", "perceptron"), "norm_name": layer_spec, "conv_block": boolean,
        "res_block": boolean, "dropout_rate": number(0, 1), "qkv_bias": boolean, "save_attn": constant(False),
    },
    "monai.SwinUNETR": {
        **_COMMON, "patch_size": constant(2), "depths": int_list(1, 8, 4, 4), "num_heads": int_list(1, 48, 4, 4),
        "window_size": per_axis(1, 16), "qkv_bias": boolean, "mlp_ratio": number(0.1, 8), "feature_size": integer(12, 192),
        "norm_name": layer_spec, "drop_rate": number(0, 1), "attn_drop_rate": number(0, 1),
        "dropout_path_rate": number(0, 1), "normalize": boolean, "patch_norm": boolean, "use_checkpoint": boolean,
        "downsample": one_of("merging", "mergingv2"), "use_v2": boolean,
    },
}
# dynamic_network_architectures' keyword arguments as cimis.model.nnunet_source stores them (class names as
# strings); the nested keyword dicts are plain JSON, bounded by the size and depth limits.
_NNUNET = {
    "input_channels": constant(1), "n_stages": integer(1, MAX_LEVELS),
    "features_per_stage": int_list(1, MAX_CHANNELS, 1, MAX_LEVELS), "conv_op": json_plain,
    "kernel_sizes": int_list(1, 7, 1, MAX_LEVELS, per_axis(1, 7)), "strides": int_list(1, 4, 1, MAX_LEVELS, per_axis(1, 4)),
    "n_conv_per_stage": int_list(1, MAX_BLOCKS, 1, MAX_LEVELS), "n_blocks_per_stage": int_list(1, MAX_BLOCKS, 1, MAX_LEVELS),
    "num_classes": integer(1, MAX_OUT_CHANNELS), "n_conv_per_stage_decoder": int_list(1, MAX_BLOCKS, 1, MAX_LEVELS - 1),
    "conv_bias": boolean, "norm_op": json_plain, "norm_op_kwargs": json_plain, "dropout_op": json_plain,
    "dropout_op_kwargs": json_plain, "nonlin": json_plain, "nonlin_kwargs": json_plain, "deep_supervision": constant(False),
    "nonlin_first": boolean, "block": json_plain, "bottleneck_channels": json_plain, "stem_channels": optional(integer(1, MAX_CHANNELS)),
}
# nnU-Net's reader (cimis.model.nnunet_source) may store further keys of its own (its axis order, say):
# those are accepted when every number in them is small and every list short.
LENIENT = set(NNUNET_BUILDERS)
MAX_LENIENT_INT = 4096
MAX_LENIENT_LIST = 64
for _name in NNUNET_BUILDERS:
    SCHEMAS[_name] = _NNUNET

# The keys a network needs (the constructor has no default for them).
REQUIRED = {
    "monai.SegResNet": (), "monai.UNet": ("channels", "strides"),
    "monai.DynUNet": ("kernel_size", "strides", "upsample_kernel_size"), "monai.UNETR": ("img_size",),
    "monai.SwinUNETR": (), "nnunet.PlainConvUNet": ("n_stages", "features_per_stage", "strides"),
    "nnunet.ResidualEncoderUNet": ("n_stages", "features_per_stage", "strides"),
}


def check_imported_args(builder: Any, args: Any, where: str, field: str = "network.args", hint: str | None = None) -> None:
    """Refuse (one line naming ``field.KEY``) constructor arguments outside the builder's schema; ``hint``
    replaces the damaged-card advice (for a source being imported)."""
    try:
        _check_args(builder, args, where, field)
    except CimisError as exc:
        if hint is None:
            raise
        raise CimisError(exc.message, hint) from None


def _check_args(builder: Any, args: Any, where: str, field: str) -> None:
    if builder not in SCHEMAS:
        raise _bad(where, "network.builder", f"is {str(builder)[:60]!r} (supported: {', '.join(IMPORTED_BUILDERS)})")
    if not isinstance(args, dict):
        raise _bad(where, field, "must be an object of constructor arguments")
    try:
        size = len(json.dumps(args))
    except (TypeError, ValueError):
        raise _bad(where, field, "must hold plain JSON values") from None
    if size > MAX_ARGS_JSON or _depth(args) > MAX_DEPTH:
        raise _bad(where, field, f"is too large or nested too deeply (at most {MAX_ARGS_JSON} bytes, depth {MAX_DEPTH})")
    schema = SCHEMAS[builder]
    for key, value in args.items():
        if key not in schema and builder in LENIENT:
            if not _small(value):
                raise _bad(where, f"{field}.{str(key)[:60]}", f"must hold integers of at most {MAX_LENIENT_INT} "
                                                             f"and lists of at most {MAX_LENIENT_LIST} entries")
            continue
        if key not in schema:
            raise _bad(where, f"{field}.{str(key)[:60]}", f"is not an argument of {builder} that CIMISLearner accepts")
        problem = schema[key](value)
        if problem:
            raise _bad(where, f"{field}.{key}", problem)
    for key in REQUIRED[builder]:
        if key not in args:
            raise _bad(where, f"{field}.{key}", f"is required by {builder}")
    _check_consistency(builder, args, where, field)


def _check_consistency(builder: str, args: dict, where: str, field: str) -> None:
    if builder == "monai.DynUNet":
        n = len(args["strides"])
        if len(args["kernel_size"]) != n or len(args["upsample_kernel_size"]) != n - 1:
            raise _bad(where, f"{field}.strides", "kernel_size must have as many entries and upsample_kernel_size one fewer")
        if args.get("filters") is not None and len(args["filters"]) != n:
            raise _bad(where, f"{field}.filters", "must have one entry per level (as many as strides)")
    if builder == "monai.UNet" and len(args["strides"]) != len(args["channels"]) - 1:
        raise _bad(where, f"{field}.strides", "must have one entry fewer than channels")
    if builder == "monai.SegResNet":
        down = args.get("blocks_down", [1, 2, 2, 4])
        if len(args.get("blocks_up", [1, 1, 1])) != len(down) - 1:
            raise _bad(where, f"{field}.blocks_up", "must have one entry fewer than blocks_down")
        filters = args.get("init_filters", 8)
        if filters * 2 ** (len(down) - 1) > 4 * MAX_CHANNELS:
            raise _bad(where, f"{field}.init_filters", f"doubles past {4 * MAX_CHANNELS} channels at the deepest level")
    if builder == "monai.UNETR":
        if args.get("hidden_size", 768) % args.get("num_heads", 12):
            raise _bad(where, f"{field}.hidden_size", "must be a multiple of num_heads")
        if any(s % 16 for s in args["img_size"]):
            raise _bad(where, f"{field}.img_size", "must be a multiple of 16 per axis (UNETR's patch)")
    if builder == "monai.SwinUNETR" and args.get("feature_size", 24) % 12:
        raise _bad(where, f"{field}.feature_size", "must be a multiple of 12")
    if builder in NNUNET_BUILDERS:
        n = args["n_stages"]
        for key in ("features_per_stage", "strides", "kernel_sizes", "n_conv_per_stage", "n_blocks_per_stage"):
            if key in args and len(args[key]) != n:
                raise _bad(where, f"{field}.{key}", f"must have one entry per stage ({n})")


def _small(value: Any) -> bool:
    if isinstance(value, dict):
        return len(value) <= MAX_LENIENT_LIST and all(_small(v) for v in value.values())
    if isinstance(value, list):
        return len(value) <= MAX_LENIENT_LIST and all(_small(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return not _is_int(value) or abs(value) <= MAX_LENIENT_INT


def monai_size_divisor(builder: str, args: dict) -> list[int]:
    """Input sizes of a MONAI network must be multiples of this per axis."""
    def product(strides):
        div = [1, 1, 1]
        for s in strides:
            s3 = s if isinstance(s, list) else [s] * 3
            div = [d * int(x) for d, x in zip(div, s3)]
        return div

    if builder == "monai.SegResNet":
        return [2 ** (len(args.get("blocks_down", [1, 2, 2, 4])) - 1)] * 3
    if builder in ("monai.UNet", "monai.DynUNet"):
        return product(args["strides"])
    if builder == "monai.UNETR":
        return [16, 16, 16]
    return [32, 32, 32]  # SwinUNETR: patch size 2, then four halvings


def check_imported_network(network: dict, where: str) -> list[int]:
    """Check an ``"imported"`` network section; returns its size divisor."""
    builder = network.get("builder")
    args = network.get("args")
    check_imported_args(builder, args, where)
    path = network.get("final_conv", "")
    if not isinstance(path, str) or len(path) > 200 or (path and not _PATH.match(path)):
        raise _bad(where, "network.final_conv", "must be a dotted attribute path like 'out.conv.conv' (or empty)")
    features = network.get("features")
    if not _is_int(features) or not 1 <= features <= 4 * MAX_CHANNELS:
        raise _bad(where, "network.features", f"must be an integer from 1 to {4 * MAX_CHANNELS}")
    divisor = network.get("divisor")
    if not isinstance(divisor, list) or len(divisor) != 3 or not all(_is_int(d) and 1 <= d <= 1024 for d in divisor):
        raise _bad(where, "network.divisor", "must be three integers from 1 to 1024")
    if builder in MONAI_BUILDERS and divisor != monai_size_divisor(builder, args):
        raise _bad(where, "network.divisor", f"does not match {builder}'s strides")
    unknown = set(network) - IMPORTED_FIELDS
    if unknown:
        raise _bad(where, f"network.{str(sorted(unknown)[0])[:60]}", "is not a setting of an imported network")
    return divisor


IMPORTED_FIELDS = {"arch", "builder", "args", "final_conv", "features", "divisor"}
