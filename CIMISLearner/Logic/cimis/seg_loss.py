"""The segmentation loss: Dice + cross-entropy, with voxels that carry no target left out of both.

nnU-Net's recipe (Isensee et al., 2021): batch Dice over the foreground channels plus cross-entropy.
Incremental steps mark unreliable pseudo-labels with ``IGNORE``; MONAI's DiceLoss masks them through its
``ignore_index`` and the cross-entropy through its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from cimis.incremental.prototypes import IGNORE


class DiceCELoss(nn.Module):
    """``Dice + CE`` over ``(B, C, X, Y, Z)`` logits and ``(B, X, Y, Z)`` or ``(B, 1, X, Y, Z)`` channel
    targets; voxels whose target is ``ignore_index`` contribute to neither term."""

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                             ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        if targets.dim() == logits.dim():
            targets = targets[:, 0]
        ce = F.cross_entropy(logits, targets, ignore_index=self.ignore_index)
        if not bool((targets != self.ignore_index).any()):
            ce = logits.sum() * 0.0  # every voxel ignored: nothing to learn from this batch
        return self.lambda_dice * self.dice(logits, targets[:, None]) + self.lambda_ce * ce
