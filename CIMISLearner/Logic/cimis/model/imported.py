"""Networks imported from other tools: a source network whose final 1x1x1 convolution becomes the head.

An imported network keeps its own architecture. It is rebuilt from a fixed table of constructors
(:data:`BUILDERS`: MONAI's SegResNet, SwinUNETR, UNet, DynUNet and UNETR; nnU-Net's networks through
:mod:`cimis.model.nnunet_source`, an optional extra) with the constructor arguments stored in the card,
checked first by :mod:`cimis.model.imported_limits`. Deep supervision is off. The convolution at
``final_conv`` (``conv_final.2.conv`` in SegResNet, ``out.conv.conv`` in UNETR and SwinUNETR,
``output_block.conv.conv`` in DynUNet) maps the features F to the class logits; it is replaced by
``Identity`` so that the backbone outputs F, and its weights move into the
:class:`~cimis.model.head.GrowableHead`. MONAI's UNet ends in a 3x3x3 convolution (and a residual unit),
not a 1x1x1 one: there ``final_conv`` is empty, the whole UNet is the backbone, F is its output
(D = its output channels) and the head is a new 1x1x1 convolution that starts as the identity.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from cimis.errors import CimisError
from cimis.model.imported_limits import IMPORTED_BUILDERS, MONAI_BUILDERS

# Where each MONAI network's 1x1x1 output convolution lives ("" = the network has none).
MONAI_FINAL_CONV = {
    "monai.SegResNet": "conv_final.2.conv",
    "monai.SwinUNETR": "out.conv.conv",
    "monai.UNet": "",
    "monai.DynUNet": "output_block.conv.conv",
    "monai.UNETR": "out.conv.conv",
}
# Arguments forced whatever the source says: one output at full resolution.
FORCED_ARGS = {"monai.DynUNet": {"deep_supervision": False}, "monai.SegResNet": {"use_conv_final": True}}


def _monai(name: str) -> Callable[..., nn.Module]:
    def build(args: dict) -> nn.Module:
        from monai.networks import nets

        kwargs = {**_tuples(args), **FORCED_ARGS.get(f"monai.{name}", {})}
        return getattr(nets, name)(**kwargs)
    return build


def _nnunet(builder: str) -> Callable[..., nn.Module]:
    def build(args: dict) -> nn.Module:
        try:
            from cimis.model.nnunet_source import build_network
        except ImportError as exc:
            raise CimisError(f"this model is an nnU-Net network ({builder}), which needs the optional package "
                             f"dynamic-network-architectures ({exc})",
                             "install it: pip install 'cimis[nnunet]'") from None
        return build_network(builder, args)
    return build


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    **{key: _monai(key.split(".", 1)[1]) for key in MONAI_BUILDERS},
    **{key: _nnunet(key) for key in IMPORTED_BUILDERS if key.startswith("nnunet.")},
}


def _tuples(args: dict) -> dict:
    """MONAI's layer specs are tuples ``("group", {"num_groups": 8})``; JSON gives lists."""
    out = {}
    for key, value in args.items():
        if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict)):
            value = (value[0], dict(value[1]))
        out[key] = value
    return out


def build_source_network(builder: str, args: dict) -> nn.Module:
    """The source network as its own tool builds it (deep supervision off), final layer included."""
    if builder not in BUILDERS:
        raise CimisError(f"unsupported network {builder!r}", f"supported: {', '.join(BUILDERS)}")
    try:
        return BUILDERS[builder](args)
    except CimisError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, AttributeError) as exc:
        raise CimisError(f"cannot build {builder} from its arguments ({str(exc)[:200]})",
                         "the model's network arguments do not describe a network this version can build") from None


def get_module(net: nn.Module, path: str) -> nn.Module:
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise CimisError(f"the network has no layer {path!r}", "the model does not match its network arguments") from None


def set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, name, module)


def final_conv_of(net: nn.Module, path: str) -> nn.Conv3d:
    """The 1x1x1 convolution at ``path`` (refused if it is anything else)."""
    conv = get_module(net, path)
    if not isinstance(conv, nn.Conv3d) or tuple(conv.kernel_size) != (1, 1, 1) or conv.groups != 1:
        raise CimisError(f"the layer {path!r} is not a 1x1x1 convolution", "it cannot become the growable head")
    return conv


class ImportedBackbone(nn.Module):
    """The source network with its final 1x1x1 convolution replaced by ``Identity``.

    Shapes: ``(B, 1, X, Y, Z)`` -> features F ``(B, D, X, Y, Z)``.
    """

    def __init__(self, builder: str, args: dict, final_conv: str, net: nn.Module | None = None):
        super().__init__()
        self.net = build_source_network(builder, args) if net is None else net
        if final_conv:
            final_conv_of(self.net, final_conv)
            set_module(self.net, final_conv, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor:  # a MONAI MetaTensor: its per-operation bookkeeping costs more than
            x = x.as_subclass(torch.Tensor)  # a small network's convolutions, and nothing here reads its metadata
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # a network that still returns deep-supervision outputs
            out = out[0]
        return out


@contextlib.contextmanager
def parameters_on_meta():
    """Build a module with every parameter and buffer moved to the meta device as it is registered.

    For counting a network's tensors without allocating them where ``torch.device("meta")`` cannot be
    used (SwinUNETR calls ``.item()`` while it is built): each tensor exists on the CPU only until it is
    registered, so the memory needed is one tensor's, bounded by the card's checked arguments.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build_on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` on the meta device (nothing allocated), falling back to :func:`parameters_on_meta`."""
    try:
        with torch.device("meta"):
            return make()
    except (RuntimeError, NotImplementedError):
        with parameters_on_meta():
            return make()
