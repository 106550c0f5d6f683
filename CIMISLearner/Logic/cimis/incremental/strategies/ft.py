"""``ft``: fine-tune on the new labels only, the lower bound: unlabelled old organs are learnt as background."""

from cimis.incremental.base import IncrementalTrainer


class FineTuning(IncrementalTrainer):
    name = "ft"

    def step_loss(self, labels, logits, features, old_logits, old_features):
        return self.segmentation(logits, labels)
