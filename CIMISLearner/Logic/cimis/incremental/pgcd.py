"""PGCD: Prototype-Guided Calibration Distillation (Zhu et al., arXiv 2511.07749; METHOD.md section 5).

Distil the old model more where its knowledge is reliable and less where it may mislead: a voxel's weight
is how well its old feature agrees with the global prototype of the class the old model predicts there
(spatial weight), and each feature channel's weight follows that prototype's magnitude (channel weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimis.distributed import all_reduce_sum, global_sum
from cimis.incremental.distillation import kl_per_voxel, unbiased_old_log_probs
from cimis.incremental.pseudo_labels import predicted_classes


class PGCDLoss(nn.Module):
    """``L_PGCD = lambda_f L_f + lambda_o L_o``.

    Args:
        lambda_f: weight of the feature term ``L_f``.
        lambda_o: weight of the output term ``L_o`` (MiB-style unbiased KL).
        tau_s: temperature of the prototype-to-feature affinity softmax.
        tau_c: temperature of the channel-weight softmax.
        spatial_weight: off -> ``w = 1`` on every participating voxel (ablation).
        channel_weight: off -> ``a = 1`` (ablation).
        output_term: off -> ``L_o`` is not computed (ablation).

    Forward shapes:
        features, old_features: ``(B, D, X, Y, Z)`` (student F, teacher F').
        logits: ``(B, n_old + n_new, X, Y, Z)``; old_logits: ``(B, n_old, X, Y, Z)``.
        labels: ``(B, X, Y, Z)`` channel indices of the step's labels (``>= n_old`` for new classes).
        prototypes: ``(n_old, D)`` global prototypes (background dynamic); valid: ``(n_old,)``.
    Returns the loss and a dict of its parts.
    """

    def __init__(self, lambda_f: float = 1.0, lambda_o: float = 1.0, tau_s: float = 0.1, tau_c: float = 1.0,
                 spatial_weight: bool = True, channel_weight: bool = True, output_term: bool = True):
        super().__init__()
        self.lambda_f, self.lambda_o = lambda_f, lambda_o
        self.tau_s, self.tau_c = tau_s, tau_c
        self.spatial_weight, self.channel_weight, self.output_term = spatial_weight, channel_weight, output_term

    @torch.no_grad()
    def voxel_weights(self, old_features, old_logits, labels, prototypes, valid, old_class=None) -> torch.Tensor:
        """``w (B, X, Y, Z)``: reliability ``r = A_{c'}`` normalised to mean 1 over participating voxels;
        0 on voxels labelled with a new class. ``old_class`` is ``c'``, computed here when not given."""
        n_old = old_logits.shape[1]
        participating = labels < n_old
        if not self.spatial_weight:
            return participating.float()
        if old_class is None:
            old_class = predicted_classes(old_logits)
        b, d = old_features.shape[:2]
        # (n_old, D) @ (B, D, V): one batched matmul, much faster on a CPU than einsum over 5-D tensors.
        cosine = torch.matmul(F.normalize(prototypes.float(), dim=1), unit_channels(old_features.float()).reshape(b, d, -1))
        # Classes without a global prototype cannot vouch for any voxel.
        cosine = cosine.masked_fill(~valid.view(1, -1, 1), float("-inf")).view(b, n_old, *old_features.shape[2:])
        affinity = torch.softmax(cosine / self.tau_s, dim=1)
        reliability = torch.nan_to_num(affinity.gather(1, old_class.unsqueeze(1)).squeeze(1))
        # A voxel whose predicted class has no prototype cannot be judged either way: it gets the mean
        # reliability (weight 1) instead of silently dropping out of L_f and L_o.
        # Means over every rank's batch (cimis/distributed.py): the weights of the global batch.
        judged = participating & valid[old_class]
        unjudged = participating & ~judged
        judged_sums = all_reduce_sum(torch.stack([(reliability * judged).sum(), judged.sum().float()]))
        if float(judged_sums[1]) > 0:
            judged_mean = judged_sums[0] / judged_sums[1]
        else:
            judged_mean = reliability.new_ones(())
        reliability = torch.where(unjudged, judged_mean, reliability) * participating
        sums = all_reduce_sum(torch.stack([reliability.sum(), participating.sum().float()]))
        mean = sums[0] / sums[1].clamp_min(1)
        return reliability / mean.clamp_min(1e-12)

    @torch.no_grad()
    def channel_weights(self, prototypes: torch.Tensor) -> torch.Tensor:
        """``a (n_old, D) = D * softmax_d(|P_{c,d}| / tau_c)``: mean 1 over channels."""
        d = prototypes.shape[1]
        if not self.channel_weight:
            return torch.ones_like(prototypes)
        return d * torch.softmax(prototypes.abs().float() / self.tau_c, dim=1)

    def forward(self, features, old_features, logits, old_logits, labels, prototypes, valid):
        n_old = old_logits.shape[1]
        old_class = predicted_classes(old_logits)  # c'(v)
        weights = self.voxel_weights(old_features, old_logits, labels, prototypes, valid, old_class)
        # Sums over every rank's batch divided by the global count of participating voxels.
        count = all_reduce_sum((labels < n_old).sum().float()).clamp_min(1)
        loss, parts = features.new_zeros((), dtype=torch.float32), {}
        if self.lambda_f != 0:  # off by default (docs/method.md): then not computed at all
            # sum_d a_{c'(v),d} sq_d(v) for every old class at once, then pick c'(v): a small matmul instead of
            # gathering a (B, D, X, Y, Z) weight tensor.
            squared = (features.float() - old_features.float()) ** 2
            b, d = squared.shape[:2]
            per_class = torch.matmul(self.channel_weights(prototypes), squared.reshape(b, d, -1)) / d
            weighted = per_class.view(b, n_old, *squared.shape[2:]).gather(1, old_class.unsqueeze(1)).squeeze(1)
            feature_term = global_sum((weights * weighted).sum()) / count
            loss = loss + self.lambda_f * feature_term
            parts["pgcd_f"] = float(feature_term.detach())
        if self.output_term:
            kl = kl_per_voxel(old_logits.float(), unbiased_old_log_probs(logits.float(), n_old))
            output_term = global_sum((weights * kl).sum()) / count
            loss = loss + self.lambda_o * output_term
            parts["pgcd_o"] = float(output_term.detach())
        return loss, parts


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` along dim 1 (zero vectors stay zero), written out: ``F.normalize`` over the channels of a
    5-D tensor is an order of magnitude slower on a CPU."""
    return x * torch.rsqrt((x * x).sum(1, keepdim=True).clamp_min(1e-24))
