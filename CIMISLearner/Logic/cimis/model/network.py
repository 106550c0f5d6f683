"""The segmentation network: a MONAI backbone that exposes its decoder features, plus a growable head.

The incremental methods (METHOD.md sections 4-6) pool prototypes from the penultimate decoder features at
output resolution, so the backbone ends in those features and :class:`~cimis.model.head.GrowableHead`, the
1x1x1 classifier, reads them.

Two backbones:

- ``dynunet``: MONAI's DynUNet (nnU-Net's architecture) with its 1x1x1 output block removed; the default
  for real CT on a GPU.
- ``unet``: MONAI's UNet with residual units, whose first layer already downsamples; built with
  ``out_channels = D`` so that its last (linear) layer gives D features at full resolution. Much cheaper
  per voxel, and on two CPU cores it learns several times faster than a DynUNet of similar cost: the
  ``small`` preset for CPUs, the demo and tests.
- ``imported``: a network imported from another tool (a MONAI bundle, an nnU-Net model) keeps its own
  architecture; its final 1x1x1 convolution becomes the head (:mod:`cimis.model.imported`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

from cimis.errors import CimisError
from cimis.model.head import GrowableHead
from cimis.model.imported_limits import IMPORTED_FIELDS

# nnU-Net's channel schedule for 3D full-resolution networks (Isensee et al., Nature Methods 2021).
NNUNET_FILTERS = (32, 64, 128, 256, 320, 320)


@dataclass
class NetworkConfig:
    """Everything needed to rebuild the network; stored in the model card.

    ``dynunet``: ``kernel_sizes`` and ``strides`` have one entry per resolution level (the first stride is
    1); per-axis entries are allowed (anisotropic data), as in MONAI's DynUNet. ``unet``: ``filters`` are
    the channels per level and ``strides`` has one entry fewer (every level downsamples);
    ``kernel_sizes`` is unused. ``imported``: ``builder`` names the constructor (cimis.model.imported),
    ``args`` are its keyword arguments, ``final_conv`` the path of the 1x1x1 convolution that the head
    replaces ("" when the network has none), ``features`` is D and ``divisor`` the network's total stride
    per axis; ``filters``, ``kernel_sizes``, ``strides`` and the rest are unused.
    """

    arch: str = "dynunet"
    in_channels: int = 1
    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    kernel_sizes: list = field(default_factory=lambda: [3, 3, 3, 3])
    strides: list = field(default_factory=lambda: [1, 2, 2, 2])
    norm: str = "instance"
    res_block: bool = False  # dynunet: residual conv blocks
    num_res_units: int = 1  # unet: residual units per level
    builder: str = ""  # imported
    args: dict = field(default_factory=dict)
    final_conv: str = ""
    features: int = 0
    divisor: list = field(default_factory=list)

    @property
    def feature_dim(self) -> int:
        """D, the channel count of the features the head reads (the finest decoder level)."""
        if self.arch == "imported":
            return int(self.features)
        return int(self.filters[0])

    @property
    def size_divisor(self) -> list[int]:
        """Patch sizes must be multiples of this per axis (the product of the strides)."""
        if self.arch == "imported":
            return [int(d) for d in self.divisor]
        div = [1, 1, 1]
        for s in self.strides:
            s3 = s if isinstance(s, (list, tuple)) else [s] * 3
            div = [d * int(x) for d, x in zip(div, s3)]
        return div

    def to_json(self) -> dict:
        d = asdict(self)
        if self.arch == "imported":
            return {k: d[k] for k in IMPORTED_FIELDS}
        return {k: v for k, v in d.items() if k not in IMPORTED_FIELDS or k == "arch"}

    @staticmethod
    def imported(builder: str, args: dict, final_conv: str, features: int, divisor: list[int]) -> "NetworkConfig":
        return NetworkConfig(arch="imported", filters=[], kernel_sizes=[], strides=[], builder=builder, args=args,
                             final_conv=final_conv, features=int(features), divisor=[int(d) for d in divisor])

    @staticmethod
    def from_json(d: dict) -> "NetworkConfig":
        known = {k: d[k] for k in NetworkConfig.__dataclass_fields__ if k in d}
        unknown = set(d) - set(known)
        if unknown:
            raise CimisError(f"unknown network settings {sorted(unknown)} in the model card")
        return NetworkConfig(**known)

    @staticmethod
    def preset(name: str, patch_size: Sequence[int], spacing: Sequence[float]) -> "NetworkConfig":
        """``"small"``: a residual U-Net with 16..128 channels, for CPUs and tests.
        ``"dynunet"``: nnU-Net's plan (kernels and strides from the patch size and spacing, channels
        32..320), the default for real CT on a GPU."""
        if name == "small":
            return NetworkConfig(arch="unet", filters=[16, 32, 64, 128], kernel_sizes=[3], strides=[2, 2, 2])
        if name == "dynunet":
            kernels, strides = nnunet_kernels_and_strides(patch_size, spacing)
            return NetworkConfig(
                filters=list(NNUNET_FILTERS[: len(strides)]), kernel_sizes=kernels, strides=strides
            )
        raise CimisError(f"unknown network preset {name!r}", "use 'small' or 'dynunet'")


def nnunet_kernels_and_strides(patch_size: Sequence[int], spacing: Sequence[float]) -> tuple[list, list]:
    """nnU-Net's rule: halve an axis while its spacing is at most twice the finest one and it stays >= 8
    voxels; use kernel 1 along an axis whose spacing is still more than twice the finest (thick slices)."""
    sizes, spacings = list(patch_size), list(spacing)
    strides, kernels = [], []
    while True:
        ratios = [sp / min(spacings) for sp in spacings]
        stride = [2 if r <= 2 and s >= 8 else 1 for r, s in zip(ratios, sizes)]
        kernel = [3 if r <= 2 else 1 for r in ratios]
        if all(s == 1 for s in stride) or len(strides) >= 5:
            break
        spacings = [sp * st for sp, st in zip(spacings, stride)]
        sizes = [s // st for s, st in zip(sizes, stride)]
        kernels.append(kernel)
        strides.append(stride)
    kernels.append([3, 3, 3])
    return kernels, [[1, 1, 1]] + strides


class SegmentationNet(nn.Module):
    """A MONAI backbone (DynUNet or residual UNet) + :class:`GrowableHead`.

    Args:
        config: the backbone's shape.
        num_channels: output channels (background plus one per class).

    Shapes: input ``(B, in_channels, X, Y, Z)`` with each spatial size a multiple of
    ``config.size_divisor``; logits ``(B, num_channels, X, Y, Z)``; features ``(B, D, X, Y, Z)`` with
    ``D = config.feature_dim``.
    """

    def __init__(self, config: NetworkConfig, num_channels: int):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.head = GrowableHead(config.feature_dim, num_channels)

    @staticmethod
    def assemble(config: NetworkConfig, backbone: nn.Module, head: GrowableHead) -> "SegmentationNet":
        """A network from an already built backbone and head (an import: the source's own weights, without
        building a second copy of them)."""
        net = SegmentationNet.__new__(SegmentationNet)
        nn.Module.__init__(net)
        net.config, net.backbone, net.head = config, backbone, head
        return net

    @property
    def num_channels(self) -> int:
        return self.head.num_channels

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the decoder features they are computed from."""
        features = self.backbone(x)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(config: NetworkConfig) -> nn.Module:
    """A MONAI network that maps ``(B, in, X, Y, Z)`` to ``(B, D, X, Y, Z)`` features."""
    norm = ("INSTANCE", {"affine": True}) if config.norm == "instance" else config.norm
    if config.arch == "unet":
        return UNet(
            spatial_dims=3, in_channels=config.in_channels, out_channels=config.feature_dim,
            channels=config.filters, strides=config.strides, num_res_units=config.num_res_units, norm=norm,
        )
    if config.arch == "imported":
        from cimis.model.imported import ImportedBackbone

        return ImportedBackbone(config.builder, config.args, config.final_conv)
    if config.arch == "dynunet":
        backbone = DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=1,  # replaced below: the head owns the classifier
            kernel_size=config.kernel_sizes,
            strides=config.strides,
            upsample_kernel_size=config.strides[1:],
            filters=config.filters,
            norm_name=norm,
            res_block=config.res_block,
        )
        backbone.output_block = nn.Identity()  # the head is the classifier
        return backbone
    raise CimisError(f"unknown network architecture {config.arch!r}", "this version knows 'dynunet', 'unet' and 'imported'")
