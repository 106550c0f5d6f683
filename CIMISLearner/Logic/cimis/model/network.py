"""The segmentation network: a MONAI DynUNet backbone that exposes its decoder features, plus a growable head.

The incremental methods (METHOD.md sections 4-6) pool prototypes from the penultimate decoder features at
output resolution, so the backbone's own 1x1x1 output block is removed and replaced by
:class:`~cimis.model.head.GrowableHead`, whose input *is* those features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

from cimis.errors import CimisError
from cimis.model.head import GrowableHead

# nnU-Net's channel schedule for 3D full-resolution networks (Isensee et al., Nature Methods 2021).
NNUNET_FILTERS = (32, 64, 128, 256, 320, 320)


@dataclass
class NetworkConfig:
    """Everything needed to rebuild the network; stored in the model card.

    ``kernel_sizes`` and ``strides`` have one entry per resolution level (the first stride is 1). Per-axis
    entries are allowed (anisotropic data), as in MONAI's DynUNet.
    """

    arch: str = "dynunet"
    in_channels: int = 1
    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    kernel_sizes: list = field(default_factory=lambda: [3, 3, 3, 3])
    strides: list = field(default_factory=lambda: [1, 2, 2, 2])
    norm: str = "instance"
    res_block: bool = False

    @property
    def feature_dim(self) -> int:
        """D, the channel count of the features the head reads (the finest decoder level)."""
        return int(self.filters[0])

    @property
    def size_divisor(self) -> list[int]:
        """Patch sizes must be multiples of this per axis (the product of the strides)."""
        div = [1, 1, 1]
        for s in self.strides:
            s3 = s if isinstance(s, (list, tuple)) else [s] * 3
            div = [d * int(x) for d, x in zip(div, s3)]
        return div

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "NetworkConfig":
        known = {k: d[k] for k in NetworkConfig.__dataclass_fields__ if k in d}
        unknown = set(d) - set(known)
        if unknown:
            raise CimisError(f"unknown network settings {sorted(unknown)} in the model card")
        return NetworkConfig(**known)

    @staticmethod
    def preset(name: str, patch_size: Sequence[int], spacing: Sequence[float]) -> "NetworkConfig":
        """``"small"``: a 4-level U-Net with 8..64 channels, for CPUs and tests.
        ``"dynunet"``: nnU-Net's plan (kernels and strides from the patch size and spacing, channels
        32..320), the default for real CT on a GPU."""
        if name == "small":
            return NetworkConfig(filters=[8, 16, 32, 64], kernel_sizes=[3] * 4, strides=[1, 2, 2, 2])
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
    """DynUNet backbone + :class:`GrowableHead`.

    Args:
        config: the backbone's shape.
        num_channels: output channels (background plus one per class).

    Shapes: input ``(B, in_channels, X, Y, Z)`` with each spatial size a multiple of
    ``config.size_divisor``; logits ``(B, num_channels, X, Y, Z)``; features ``(B, D, X, Y, Z)`` with
    ``D = config.feature_dim``.
    """

    def __init__(self, config: NetworkConfig, num_channels: int):
        super().__init__()
        if config.arch != "dynunet":
            raise CimisError(f"unknown network architecture {config.arch!r}", "this version knows 'dynunet'")
        self.config = config
        n = len(config.filters)
        norm = ("INSTANCE", {"affine": True}) if config.norm == "instance" else config.norm
        self.backbone = DynUNet(
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
        assert len(config.strides) == n
        self.backbone.output_block = nn.Identity()
        self.head = GrowableHead(config.feature_dim, num_channels)

    @property
    def num_channels(self) -> int:
        return self.head.num_channels

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the decoder features they are computed from."""
        features = self.backbone(x)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
