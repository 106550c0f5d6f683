"""``joint``: every class with every label at once, trained from scratch: the upper bound.

It needs a dataset whose labels carry the old classes too; it ignores the previous model's weights and
uses only its class list, network and preprocessing.
"""

from cimis.incremental.base import IncrementalTrainer


class Joint(IncrementalTrainer):
    name = "joint"
    fresh_start = True  # learn_step builds a new network and keeps every class's labels

    def step_loss(self, labels, logits, features, old_logits, old_features):
        return self.segmentation(logits, labels)

    def loss(self, batch, logits, features):  # no teacher: nothing to distil
        return self.segmentation(logits, batch["label"][:, 0].long())
