"""``plop``: pseudo-labels + Local POD on the decoder features and the logits, init-balanced head
(Douillard et al., CVPR 2021)."""

import math

from cimis.incremental.base import IncrementalTrainer
from cimis.incremental.pod import local_pod_loss


class PLOP(IncrementalTrainer):
    name = "plop"
    required_options = ("pod_features", "pod_logits")
    uses_pseudo_labels = True

    def step_loss(self, labels, logits, features, old_logits, old_features):
        loss, parts = self.segmentation(logits, self.targets(labels, old_logits))
        n_all, n_new = logits.shape[1], logits.shape[1] - self.n_old
        adaptive = math.sqrt(n_all / n_new)  # PLOP: distil harder when few classes are new
        pod_f = local_pod_loss(features, old_features)
        pod_o = local_pod_loss(logits[:, : self.n_old], old_logits)
        loss = loss + adaptive * (self.options.pod_features * pod_f + self.options.pod_logits * pod_o)
        return loss, {**parts, "pod_f": float(pod_f.detach()), "pod_o": float(pod_o.detach())}
