"""The segmentation loss: Dice + cross-entropy, with voxels that carry no target left out of both.

nnU-Net's recipe (Isensee et al., 2021): batch Dice over the foreground channels plus cross-entropy.
Incremental steps mark unreliable pseudo-labels with ``IGNORE``; neither term sees those voxels.

Both terms are ratios of sums over the batch (the Dice's overlaps and volumes, the cross-entropy's sum over
the voxels it counts), so under data parallelism the sums are added across ranks before dividing
(cimis/distributed.py): the loss, and its gradient, are those of the whole global batch in one process.
The Dice is MONAI's ``DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
ignore_index=IGNORE)`` written out so that its sums can be reduced (Testing: test_losses.py compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimis.distributed import all_reduce_sum, global_sum
from cimis.incremental.prototypes import IGNORE

SMOOTH = 1e-5  # MONAI's smooth_nr and smooth_dr


def batch_dice_loss(probs: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``mean over foreground channels c of 1 - (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)``, the sums over
    the voxels in ``keep`` of every rank's batch.

    Args:
        probs: softmax ``(B, C, X, Y, Z)``.
        targets: ``(B, X, Y, Z)`` channel indices (any value where ``keep`` is False).
        keep: ``(B, X, Y, Z)`` boolean, the voxels with a target.
    """
    n = probs.shape[1]
    weights = keep.unsqueeze(1).to(probs.dtype)
    one_hot = F.one_hot(torch.where(keep, targets, torch.zeros_like(targets)), n).movedim(-1, 1).to(probs.dtype)
    p, g = (probs * weights)[:, 1:], (one_hot * weights)[:, 1:]
    axes = [0, *range(2, probs.dim())]
    sums = global_sum(torch.stack([(p * g).sum(axes), p.sum(axes), g.sum(axes)]))  # (3, C - 1)
    overlap, predicted, reference = sums
    return (1 - (2 * overlap + SMOOTH) / (predicted + reference + SMOOTH)).mean()


class DiceCELoss(nn.Module):
    """``Dice + CE`` over ``(B, C, X, Y, Z)`` logits and ``(B, X, Y, Z)`` or ``(B, 1, X, Y, Z)`` channel
    targets; voxels whose target is ``ignore_index`` contribute to neither term."""

    def __init__(self, ignore_index: int = IGNORE, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        if targets.dim() == logits.dim():
            targets = targets[:, 0]
        keep = targets != self.ignore_index
        # Every voxel ignored (on every rank): the sum is 0 and so is the term, still part of the graph.
        ce_sum = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        counted = all_reduce_sum(keep.sum().to(logits.dtype))
        ce = global_sum(ce_sum) / counted.clamp_min(1)
        dice = batch_dice_loss(torch.softmax(logits, 1), targets, keep)
        return self.lambda_dice * dice + self.lambda_ce * ce
