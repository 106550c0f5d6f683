"""``mib``: unbiased cross-entropy and Dice, unbiased distillation, init-balanced head (Cermelli et al., 2020).

The segmentation loss merges background with every old class (a background-labelled voxel may be an old
organ); in 3D we add the Dice term on the same merged probabilities, as every strategy here uses Dice + CE.
"""

import torch
from monai.losses import DiceLoss

from cimis.incremental.base import IncrementalTrainer
from cimis.incremental.distillation import unbiased_cross_entropy, unbiased_kd


class MiB(IncrementalTrainer):
    """KD weight ``options.kd_weight`` (method_settings.json: MiB's preset, 10)."""

    name = "mib"
    required_options = ("kd_weight",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.merged_dice = DiceLoss(to_onehot_y=True, include_background=False, batch=True)

    def step_loss(self, labels, logits, features, old_logits, old_features):
        n_old = self.n_old
        probs = torch.softmax(logits, 1)
        merged = torch.cat([probs[:, :n_old].sum(1, keepdim=True), probs[:, n_old:]], dim=1)
        merged_labels = torch.where(labels >= n_old, labels - n_old + 1, torch.zeros_like(labels))
        seg = unbiased_cross_entropy(logits, labels, n_old) + self.merged_dice(merged, merged_labels[:, None])
        kd = unbiased_kd(logits, old_logits)
        return seg + self.options.kd_weight * kd, {"seg": float(seg.detach()), "kd": float(kd.detach())}
