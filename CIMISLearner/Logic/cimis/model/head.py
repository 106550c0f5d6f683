"""A 1x1x1 convolutional classifier that can grow new output channels without touching the old ones."""

from __future__ import annotations

import math

import torch
from torch import nn


class GrowableHead(nn.Module):
    """Per-voxel linear classifier ``z(v) = W F(v) + b`` over decoder features.

    Args:
        in_features: D, the feature channels of the decoder's last layer.
        num_channels: output channels (background plus one per class).

    Shapes: input ``(B, D, X, Y, Z)`` -> logits ``(B, num_channels, X, Y, Z)``.
    """

    def __init__(self, in_features: int, num_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_features, num_channels, kernel_size=1)

    @property
    def in_features(self) -> int:
        return self.conv.in_channels

    @property
    def num_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)

    @torch.no_grad()
    def grow(self, num_new: int, init: str = "balanced") -> None:
        """Append ``num_new`` output channels; the weights of the existing channels are copied unchanged.

        Args:
            num_new: how many classes to add.
            init: ``"balanced"`` is MiB's init (Cermelli et al., CVPR 2020; METHOD.md section 2): each new
                channel copies the background channel's weights, and the biases of background and of every
                new channel become ``b_bg - log(num_new + 1)``. Right after growth the background
                probability then splits evenly over background and the new classes, and every old class's
                probability is unchanged. ``"random"`` keeps PyTorch's default init for the new channels
                and leaves the background bias alone, so every old logit is unchanged.

        The parameters are replaced: build the optimizer after growing.
        """
        if num_new < 1:
            raise ValueError(f"num_new must be >= 1, got {num_new}")
        if init not in ("balanced", "random"):
            raise ValueError(f"init must be 'balanced' or 'random', got {init!r}")
        old = self.conv
        new = nn.Conv3d(old.in_channels, old.out_channels + num_new, kernel_size=1).to(old.weight.device, old.weight.dtype)
        new.weight[: old.out_channels] = old.weight
        new.bias[: old.out_channels] = old.bias
        if init == "balanced":
            new.weight[old.out_channels :] = old.weight[0]
            balanced_bias = old.bias[0] - math.log(num_new + 1)
            new.bias[old.out_channels :] = balanced_bias
            new.bias[0] = balanced_bias
        self.conv = new
