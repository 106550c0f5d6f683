"""DAPD: Dual-Aligned Prototype Distillation (Zhu et al., arXiv 2511.07749; METHOD.md section 6).

The current model's local prototype of each old class in the batch is pulled toward both that class's
global prototype (from the end of the previous step; background's follows the data) and the old model's
local prototype on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimis.distributed import all_reduce_sum, global_sum


def class_sums(features: torch.Tensor, targets: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums ``(n_classes, D)`` and voxel counts ``(n_classes,)`` over batch and space, for
    channel indices ``0 .. n_classes - 1`` in ``targets`` (others, ignored or new classes, count nowhere):
    one one-hot matmul instead of a masked average per class."""
    b, d = features.shape[:2]
    flat_targets = targets.reshape(b, -1)
    one_hot = (flat_targets.unsqueeze(1) == torch.arange(n_classes, device=targets.device).view(1, -1, 1))
    one_hot = one_hot.to(features.dtype)  # (B, C, V)
    sums = torch.matmul(one_hot, features.reshape(b, d, -1).transpose(1, 2)).sum(0)  # (C, D)
    return sums, one_hot.sum((0, 2))


class DAPDLoss(nn.Module):
    """``L_DAPD = lambda_p * (mean_g + mean_l)``: ``mean_g`` is the mean of ``L_g(c) = 1 - cos(p_c, P_c)`` over
    the old classes present in the batch that have a global prototype, ``mean_l`` the mean of
    ``L_l(c) = 1 - cos(p_c, p'_c)`` over the old classes present. When every present class has its
    prototype this is METHOD.md's ``mean over present c of (L_g(c) + L_l(c))``; a class without one no
    longer dilutes the global mean with a zero.

    Args:
        lambda_p: overall weight.
        global_term, local_term: switch either alignment off (ablation).

    Forward shapes: features, old_features ``(B, D, X, Y, Z)``; targets ``(B, X, Y, Z)`` = y~ (channel
    indices, negative = ignored); prototypes ``(n_old, D)``; valid ``(n_old,)``.
    """

    def __init__(self, lambda_p: float = 0.1, global_term: bool = True, local_term: bool = True):
        super().__init__()
        self.lambda_p = lambda_p
        self.global_term, self.local_term = global_term, local_term

    def forward(self, features, old_features, targets, prototypes, valid):
        n_old = prototypes.shape[0]
        sums, counts = class_sums(features.float(), targets, n_old)
        # Local prototypes of the global batch: sums and counts added across ranks (cimis/distributed.py).
        sums, counts = global_sum(sums), all_reduce_sum(counts.detach().clone())
        present = counts > 0
        local = sums / counts.clamp_min(1).unsqueeze(1)
        loss = features.sum() * 0.0  # keeps the graph connected when no term applies
        parts = {"dapd_g": 0.0, "dapd_l": 0.0}
        if self.global_term:
            with_prototype = present & valid.bool()
            if bool(with_prototype.any()):
                g = 1 - F.cosine_similarity(local[with_prototype], prototypes[with_prototype].float(), dim=1)
                loss = loss + g.mean()
                parts["dapd_g"] = float(g.detach().mean())
        if self.local_term and bool(present.any()):
            with torch.no_grad():
                old_sums = all_reduce_sum(class_sums(old_features.float(), targets, n_old)[0])
                old_local = old_sums / counts.clamp_min(1).unsqueeze(1)
            l = 1 - F.cosine_similarity(local[present], old_local[present], dim=1)
            loss = loss + l.mean()
            parts["dapd_l"] = float(l.detach().mean())
        return self.lambda_p * loss, parts
