"""``pseudo-labels``: PLOP's pseudo-labels of the old organs (METHOD.md section 3) and nothing else.

The segmentation loss on ``y~`` with no distillation term: ``pgcd-dapd`` minus PGCD and DAPD, so that what
those two terms add is visible on its own in a benchmark.
"""

from cimis.incremental.base import IncrementalTrainer


class PseudoLabels(IncrementalTrainer):
    name = "pseudo-labels"
    uses_pseudo_labels = True

    def step_loss(self, labels, logits, features, old_logits, old_features):
        return self.segmentation(logits, self.targets(labels, old_logits))
