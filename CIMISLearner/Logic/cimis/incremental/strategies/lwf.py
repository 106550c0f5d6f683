"""``lwf``: fine-tuning plus plain distillation of the old classes' outputs (Li & Hoiem, 2017)."""

from cimis.incremental.distillation import plain_kd
from cimis.incremental.strategies.ft import FineTuning

KD_WEIGHT = 100.0  # MiB's preset for LwF


class LwF(FineTuning):
    name = "lwf"

    def kd_weight(self) -> float:
        return self.options.kd_weight if self.options.kd_weight is not None else KD_WEIGHT

    def step_loss(self, labels, logits, features, old_logits, old_features):
        loss, parts = super().step_loss(labels, logits, features, old_logits, old_features)
        kd = plain_kd(logits, old_logits)
        return loss + self.kd_weight() * kd, {**parts, "kd": float(kd.detach())}
