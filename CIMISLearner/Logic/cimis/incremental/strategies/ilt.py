"""``ilt``: LwF plus an MSE between the old and new decoder features (Michieli & Zanuttigh, 2019)."""

import torch.nn.functional as F

from cimis.incremental.strategies.lwf import LwF


class ILT(LwF):
    name = "ilt"
    required_options = ("kd_weight", "feature_kd_weight")

    def step_loss(self, labels, logits, features, old_logits, old_features):
        loss, parts = super().step_loss(labels, logits, features, old_logits, old_features)
        feature_kd = F.mse_loss(features, old_features)
        return loss + self.options.feature_kd_weight * feature_kd, {**parts, "feature_kd": float(feature_kd.detach())}
