"""``lwf``: fine-tuning plus plain distillation of the old classes' outputs (Li & Hoiem, 2017)."""

from cimis.incremental.distillation import plain_kd
from cimis.incremental.strategies.ft import FineTuning


class LwF(FineTuning):
    """KD weight: ``options.kd_weight`` (method_settings.json: MiB's preset, 100, of the KD averaged over the
    old classes)."""

    name = "lwf"
    required_options = ("kd_weight",)

    def step_loss(self, labels, logits, features, old_logits, old_features):
        loss, parts = super().step_loss(labels, logits, features, old_logits, old_features)
        kd = plain_kd(logits, old_logits)
        return loss + self.options.kd_weight * kd, {**parts, "kd": float(kd.detach())}
