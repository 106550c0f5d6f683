"""What every incremental strategy shares: the frozen old model, the step's options, the class layout.

A strategy is a small subclass of :class:`IncrementalTrainer` that states only what differs: how the head
grows, and :meth:`IncrementalTrainer.step_loss`. Channel layout during step t: ``0`` background,
``1 .. n_old - 1`` old organs, ``n_old ..`` the new classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from cimis import distributed
from cimis.errors import CimisError
from cimis.incremental.method_settings import resolve_options
from cimis.incremental.pseudo_labels import EntropyThresholds, pseudo_label_targets
from cimis.infer import iterate_tiles
from cimis.device import autocast
from cimis.train import Trainer


WEIGHTS = ("lambda_f", "lambda_o", "lambda_p", "kd_weight", "feature_kd_weight", "pod_features", "pod_logits")


@dataclass
class StepOptions:
    """Loss weights, temperatures and the ablation switches of METHOD.md section 7 (all on by default)."""

    pseudo_labels: bool = True
    spatial_weight: bool = True
    channel_weight: bool = True
    output_term: bool = True
    dapd_global: bool = True
    dapd_local: bool = True
    dynamic_background: bool = True
    # Per-method settings: None takes the method's value from method_settings.json (resolve_options), where
    # each value says where it came from; the trainer resolves them before the first iteration.
    head_init: str | None = None  # "balanced" | "random"
    lambda_f: float | None = None  # pgcd-dapd: PGCD's feature term (0, off: docs/method.md)
    lambda_o: float | None = None  # pgcd-dapd: PGCD's output term
    lambda_p: float | None = None  # pgcd-dapd: DAPD
    tau_s: float = 0.1
    tau_c: float = 1.0
    momentum: float = 0.99
    entropy_floor: float = 0.001
    kd_weight: float | None = None  # lwf, ilt, mib: weight of the KD averaged over the old classes
    feature_kd_weight: float | None = None  # ilt
    pod_features: float | None = None  # plop
    pod_logits: float | None = None  # plop

    def __post_init__(self):
        if self.head_init not in (None, "balanced", "random"):
            raise CimisError(f"unknown head init {self.head_init!r}", "use balanced or random")
        for name in WEIGHTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise CimisError(f"{name} must be a number of at least 0, not {value}")  # also refuses NaN

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "StepOptions":
        known = {f.name for f in fields(StepOptions)}
        unknown = set(d) - known
        if unknown:
            raise CimisError(f"unknown step options {sorted(unknown)}", f"known: {', '.join(sorted(known))}")
        return StepOptions(**d)


class IncrementalTrainer(Trainer):
    """Trains the grown student ``net`` on a step's new-only labels with the frozen ``old_net`` at hand.

    Args (beyond :class:`~cimis.train.Trainer`'s):
        old_net: M_{t-1}; run in eval mode without autograd, in the student's precision.
        n_old: ``|O_t|``, the old model's output channels (background included).
        options: :class:`StepOptions`; unset per-method fields come from ``method_settings`` (default: the
            versioned file, cimis/incremental/method_settings.py).
        prototypes: the old model's global prototypes ``((n_old, D), (n_old,))`` or None.
    """

    kind = "learn"
    name = "incremental"
    uses_pseudo_labels = False
    required_options: tuple[str, ...] = ()  # per-method settings the loss reads (method_settings.json)

    def __init__(self, net, old_net, n_old: int, options: StepOptions, prototypes=None, method_settings=None,
                 **trainer_kwargs):
        super().__init__(net, **trainer_kwargs)
        self.old_net = old_net.to(self.device).eval().requires_grad_(False)
        self.n_old = n_old
        self.options = resolve_options(self.name, options, method_settings)
        missing = [k for k in self.required_options if getattr(self.options, k) is None]
        if missing:
            raise CimisError(f"{self.name} needs the settings {', '.join(missing)}",
                             "give them as options or in the method settings file")
        self.old_prototypes = prototypes
        self.thresholds: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------ the teacher
    @torch.no_grad()
    def teacher(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Old logits ``(B, n_old, ...)`` and features ``(B, D, ...)``; the caller's autocast applies."""
        logits, features = self.old_net.forward_with_features(image)
        return logits.float(), features.float()

    def targets(self, labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        """``y~`` when the strategy uses pseudo-labels (and the switch is on), else the labels."""
        if self.uses_pseudo_labels and self.options.pseudo_labels:
            return pseudo_label_targets(labels, torch.softmax(old_logits, 1), self.thresholds, self.n_old)
        return labels

    def before_training(self, train_cases, manifest_classes) -> None:
        if self.uses_pseudo_labels and self.options.pseudo_labels:
            # This rank's share of the step's volumes (all of them in one process).
            self.train_volumes = self.model_space_volumes(distributed.share(train_cases), manifest_classes)
            self.thresholds = self.estimate_thresholds(self.train_volumes)

    @torch.no_grad()
    def estimate_thresholds(self, volumes: list[dict]) -> torch.Tensor:
        """PLOP's per-class entropy thresholds, from the old model over every voxel of the step's data.
        ``volumes`` is this rank's share of them (:func:`cimis.distributed.share`): the histograms are added
        across ranks, so every rank gets the thresholds of the whole data."""
        stats = EntropyThresholds(self.n_old, self.options.entropy_floor)
        for volume in volumes:
            for image, _, valid in iterate_tiles(volume["image"], None, self.preprocess.patch_size):
                with autocast(self.device, self.config.amp):
                    old_logits, _ = self.teacher(image.to(self.device))
                stats.add(torch.softmax(old_logits, 1), valid)
        distributed.all_reduce_sum(stats.histograms)
        thresholds = stats.thresholds()
        distributed.check_replicas_agree([thresholds], "pseudo-label thresholds")
        return thresholds

    def replicated_state(self) -> list[torch.Tensor]:
        return [self.thresholds] if self.thresholds is not None else []

    # --------------------------------------------------------------------------------------- the loss
    def loss(self, batch, logits, features):
        old_logits, old_features = self.teacher(batch["image"])
        labels = batch["label"][:, 0].long()
        return self.float32_step_loss(labels, logits, features, old_logits, old_features)

    def float32_step_loss(self, labels, logits, features, old_logits, old_features) -> tuple[torch.Tensor, dict]:
        """:meth:`step_loss` in float32 with autocast off: divergences, cosines and prototype sums lose too much
        in half precision (the training loop calls the loss inside its autocast region)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.step_loss(labels, logits.float(), features.float(), old_logits.float(), old_features.float())

    def step_loss(self, labels, logits, features, old_logits, old_features) -> tuple[torch.Tensor, dict]:
        """The strategy's loss. labels ``(B, X, Y, Z)`` hold 0 or new channels (``>= n_old``)."""
        raise NotImplementedError

    def segmentation(self, logits, targets) -> tuple[torch.Tensor, dict]:
        loss = self.seg_loss(logits, targets)
        return loss, {"seg": float(loss.detach())}

    # ------------------------------------------------------------------ prototypes at the end of a step
    def final_targets(self):
        """``f(image_tile, label_tile) -> y~`` for the end-of-step global prototypes (METHOD.md section 4)."""

        def targets_of(image, label):
            with autocast(self.device, self.config.amp):
                old_logits, _ = self.teacher(image)
            labels = label[:, 0] if label.dim() == 5 else label
            return pseudo_label_targets(labels, torch.softmax(old_logits, 1), self.thresholds, self.n_old)

        return targets_of
