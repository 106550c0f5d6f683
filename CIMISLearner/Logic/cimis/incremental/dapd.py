"""DAPD: Dual-Aligned Prototype Distillation (Zhu et al., arXiv 2511.07749; METHOD.md section 6).

The current model's local prototype of each old class in the batch is pulled toward both that class's
global prototype (from the end of the previous step; background's follows the data) and the old model's
local prototype on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimis.incremental.prototypes import masked_average


class DAPDLoss(nn.Module):
    """``L_DAPD = lambda_p * mean over present old classes c of (L_g(c) + L_l(c))`` with
    ``L_g(c) = 1 - cos(p_c, P_c)`` and ``L_l(c) = 1 - cos(p_c, p'_c)``.

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
        per_class, g_sum, l_sum, n = [], 0.0, 0.0, 0
        for c in range(n_old):
            mask = targets == c
            if not bool(mask.any()):
                continue
            local = masked_average(features.float(), mask)
            term = features.new_zeros((), dtype=torch.float32)
            if self.global_term and bool(valid[c]):
                g = 1 - F.cosine_similarity(local, prototypes[c].float(), dim=0)
                term, g_sum = term + g, g_sum + float(g.detach())
            if self.local_term:
                with torch.no_grad():
                    old_local = masked_average(old_features.float(), mask)
                l = 1 - F.cosine_similarity(local, old_local, dim=0)
                term, l_sum = term + l, l_sum + float(l.detach())
            per_class.append(term)
            n += 1
        if not per_class:
            zero = features.sum() * 0.0  # keeps the graph connected
            return zero, {"dapd_g": 0.0, "dapd_l": 0.0}
        loss = self.lambda_p * torch.stack(per_class).mean()
        return loss, {"dapd_g": g_sum / n, "dapd_l": l_sum / n}
