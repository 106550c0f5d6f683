"""``pgcd-dapd``: our method (Zhu et al., arXiv 2511.07749; METHOD.md sections 3-7).

``L = L_seg(y~) + L_PGCD + L_DAPD``, pseudo-labels of the old organs, and the global prototype bank whose
background prototype follows the old model's background after every step. The new head channels start
from PyTorch's default init, not MiB's init-balanced (METHOD.md section 2): with init-balanced every new
channel starts at a seventh of the background probability on every voxel, the background voxels push all
of them down at once, and in a step's budget they never come back (docs/method.md has the numbers).
``--head-init balanced`` restores the specification's choice. PGCD's feature term is off by default
(``lambda_f = 0``, chosen on validation phantoms: it slowed the new organs and kept no old one better;
``--lambda-f`` turns it on). These defaults live in method_settings.json with their sources. The
background prototype goes into the step's checkpoints, so a resumed step continues its moving average.
A model without prototypes (one imported without ``--volumes``) gets them before training from the step's
own images, with the old model's confident predictions as targets (docs/method.md).
"""

import torch

from cimis.errors import CimisError
from cimis.incremental.base import IncrementalTrainer
from cimis.incremental.dapd import DAPDLoss
from cimis.incremental.pgcd import PGCDLoss
from cimis.incremental.prototypes import PrototypeBank


class PGCDDAPD(IncrementalTrainer):
    name = "pgcd-dapd"
    required_options = ("lambda_f", "lambda_o", "lambda_p")
    uses_pseudo_labels = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        self._pending_background_state = None
        if self.old_prototypes is None:
            if not self.imported_old_model():
                raise CimisError("the previous model has no global prototypes, which pgcd-dapd needs",
                                 "retrain it with this version, or use another strategy")
            self.bank = None  # computed in before_training, from the step's own images
        else:
            self._make_bank(*self.old_prototypes)
        self.pgcd = PGCDLoss(o.lambda_f, o.lambda_o, o.tau_s, o.tau_c, o.spatial_weight, o.channel_weight, o.output_term)
        self.dapd = DAPDLoss(o.lambda_p, o.dapd_global, o.dapd_local)
        self._background_update = None

    def step_loss(self, labels, logits, features, old_logits, old_features):
        targets = self.targets(labels, old_logits)
        loss, parts = self.segmentation(logits, targets)
        protos, valid = self.bank.prototypes, self.bank.valid
        pgcd, pgcd_parts = self.pgcd(features, old_features, logits, old_logits, labels, protos, valid)
        dapd, dapd_parts = self.dapd(features, old_features, targets, protos, valid)
        self._background_update = (old_features.detach(), targets.detach())
        return loss + pgcd + dapd, {**parts, **pgcd_parts, **dapd_parts}

    def imported_old_model(self) -> bool:
        return getattr(self.old_net.config, "arch", "") == "imported"

    def _make_bank(self, bank, valid) -> None:
        o = self.options
        self.bank = PrototypeBank(bank[: self.n_old], valid[: self.n_old], o.momentum, o.dynamic_background).to(self.device)

    def before_training(self, train_cases, manifest_classes) -> None:
        super().before_training(train_cases, manifest_classes)
        if self.bank is None:
            from cimis.incremental.prototypes import confident_prototypes

            volumes = getattr(self, "train_volumes", None) or self.model_space_volumes(train_cases, manifest_classes)
            self.old_prototypes = confident_prototypes(self.old_net, [v["image"] for v in volumes],
                                                       self.preprocess.patch_size, self.device, amp=self.config.amp)
            self._make_bank(*self.old_prototypes)
            if self._pending_background_state is not None:
                self.bank.load_background_state(self._pending_background_state)

    def checkpoint_state(self) -> dict:
        return self.bank.background_state()

    def restore_checkpoint_state(self, state: dict) -> None:
        if self.bank is None:
            self._pending_background_state = state  # applied once the prototypes exist (before_training)
        else:
            self.bank.load_background_state(state)

    def replicated_state(self) -> list[torch.Tensor]:
        return [*super().replicated_state(), self.bank.prototypes, self.bank.valid.float()]

    @torch.no_grad()
    def after_step(self) -> None:
        # After the optimiser step: the loss of this iteration used the prototype before the update.
        if self._background_update is not None:
            self.bank.update_background(*self._background_update)
            self._background_update = None
