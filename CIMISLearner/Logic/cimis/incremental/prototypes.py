"""Class prototypes: masked average pooling of decoder features (METHOD.md section 4).

Shapes: features ``(B, D, X, Y, Z)``, targets ``(B, X, Y, Z)`` of channel indices (``IGNORE`` marks voxels
without a target). A prototype is a ``(D,)`` vector; a bank of them is ``(C, D)`` with a ``(C,)`` mask of
which classes have one.
"""

from __future__ import annotations

import torch

from cimis import distributed
from cimis.errors import CimisError

# Target value of voxels that no loss may use (unreliable pseudo-labels).
IGNORE = -1


def masked_average(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``proto(F, mask) = sum_v mask(v) F(v) / sum_v mask(v)`` over batch and space.

    Args:
        features: ``(B, D, X, Y, Z)``.
        mask: ``(B, X, Y, Z)`` boolean or weights; must not be all zero.
    Returns ``(D,)``.
    """
    weights = mask.to(features.dtype).unsqueeze(1)
    return (features * weights).sum(dim=(0, 2, 3, 4)) / weights.sum()


def class_prototypes(features: torch.Tensor, targets: torch.Tensor, classes) -> dict[int, torch.Tensor]:
    """Local prototypes ``p_c`` of each channel ``c`` in ``classes`` present in ``targets``."""
    return {int(c): masked_average(features, targets == c) for c in classes if bool((targets == c).any())}


class PrototypeAccumulator:
    """Running sums for global prototypes over a whole dataset: ``P_c = sum F(v) / count`` over every voxel
    whose target is ``c``, accumulated batch by batch without keeping the features. The sums live on the
    device of the features they receive (no copy of every tile to the host); :meth:`result` is on the CPU."""

    def __init__(self, num_channels: int, feature_dim: int, device: torch.device | str = "cpu"):
        # float64 on the device: a whole dataset's sum of float32 features would lose digits.
        self.sums = torch.zeros(num_channels, feature_dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_channels, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """features ``(B, D, ...)``, targets ``(B, ...)`` channel indices (``IGNORE`` skipped)."""
        d = features.shape[1]
        device = self.sums.device
        flat_features = features.detach().to(device, torch.float64).movedim(1, -1).reshape(-1, d)
        flat_targets = targets.reshape(-1).to(device).long()
        keep = (flat_targets >= 0) & (flat_targets < self.counts.numel())
        self.sums.index_add_(0, flat_targets[keep], flat_features[keep])
        self.counts += torch.bincount(flat_targets[keep], minlength=self.counts.numel()).double()

    def reduce_across_ranks(self) -> None:
        """Add every rank's sums and counts (each rank accumulated its share of the data)."""
        distributed.all_reduce_sum(self.sums)
        distributed.all_reduce_sum(self.counts)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes ``(C, D)`` (zeros where a class was never seen) and the ``(C,)`` mask of seen classes."""
        sums, counts = self.sums.cpu(), self.counts.cpu()
        valid = counts > 0
        protos = torch.zeros_like(sums)
        protos[valid] = sums[valid] / counts[valid, None]
        return protos.float(), valid


def carry_over_prototypes(new: tuple[torch.Tensor, torch.Tensor],
                          old: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The end-of-step bank ``new`` with each class it lacks (``valid`` False) but ``old`` had taking the old
    prototype: an old organ absent from a step's data keeps its global prototype instead of losing it for
    good. ``old`` covers the first ``len(old)`` channels of ``new``."""
    protos, valid = new[0].clone(), new[1].clone()
    old_protos, old_valid = old
    n = min(old_protos.shape[0], protos.shape[0])
    keep = ~valid[:n] & old_valid[:n].bool()
    protos[:n][keep] = old_protos[:n][keep].to(protos.dtype)
    valid[:n] |= keep
    return protos, valid


class PrototypeBank(torch.nn.Module):
    """Global prototypes ``P_c`` during an incremental step: fixed, except background, which follows the
    old model's batch background prototype by an exponential moving average (the dynamic background
    prototype): ``P_0 <- m P_0 + (1 - m) proto(F', y~ = 0)``.

    Buffers (so they move with ``.to(device)``): ``prototypes (C_old, D)``, ``valid (C_old,)``.
    """

    def __init__(self, prototypes: torch.Tensor, valid: torch.Tensor, momentum: float = 0.99, dynamic_background: bool = True):
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone().float())
        self.register_buffer("valid", valid.detach().clone().bool())
        self.momentum = momentum
        self.dynamic_background = dynamic_background

    @torch.no_grad()
    def update_background(self, old_features: torch.Tensor, targets: torch.Tensor) -> None:
        """One EMA step of ``P_0`` toward the batch's background prototype of the old model's features;
        skipped when the batch has no background voxel or the dynamic background is switched off. Under
        data parallelism the batch is every rank's: the sums and counts are added across ranks, so every
        rank holds the same ``P_0``."""
        if not self.dynamic_background:
            return
        weights = (targets == 0).to(torch.float64).unsqueeze(1)
        features = old_features.to(torch.float64)
        sums = torch.cat([(features * weights).sum(dim=(0, 2, 3, 4)), weights.sum().reshape(1)])
        distributed.all_reduce_sum(sums)
        if not float(sums[-1]) > 0:
            return
        batch_proto = (sums[:-1] / sums[-1]).to(self.prototypes.dtype)
        if bool(self.valid[0]):
            self.prototypes[0] = self.momentum * self.prototypes[0] + (1 - self.momentum) * batch_proto
        else:
            self.prototypes[0] = batch_proto
            self.valid[0] = True

    def background_state(self) -> dict:
        """P_0 and whether it is set, as JSON numbers for a training checkpoint's state, so that a resumed
        step continues the moving average rather than restarting it from the stored prototype."""
        return {"background_prototype": [float(v) for v in self.prototypes[0].cpu()],
                "background_valid": bool(self.valid[0])}

    @torch.no_grad()
    def load_background_state(self, state: dict) -> None:
        """Restore :meth:`background_state`; a checkpoint without it (an older one) leaves P_0 as stored."""
        if "background_prototype" not in state:
            return
        values = torch.tensor(state["background_prototype"], dtype=self.prototypes.dtype)
        if values.shape != self.prototypes[0].shape:
            raise CimisError("the checkpoint's background prototype does not fit this model",
                             "run without --resume to start afresh")
        self.prototypes[0] = values.to(self.prototypes.device)
        self.valid[0] = bool(state["background_valid"])


@torch.no_grad()
def global_prototypes(
    net: torch.nn.Module,
    volumes: list[dict],
    patch_size,
    device: torch.device,
    targets_of=None,
    amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global prototypes ``P_c`` of ``net``'s features over every voxel of ``volumes`` whose target is ``c``.

    Args:
        volumes: model-space dicts with ``image`` and ``label`` ``(1, X, Y, Z)``; under data parallelism
            this rank's share of them (:func:`cimis.distributed.share`): the sums are added across ranks.
        targets_of: ``f(image_tile, label_tile) -> targets`` (``y~`` of an incremental step); default: the
            label itself (step 0).
    Returns ``(C, D)`` prototypes and the ``(C,)`` mask of classes that occurred.
    """
    from cimis.device import autocast
    from cimis.infer import iterate_tiles

    net = distributed.unwrap(net)
    was_training = net.training
    net.eval()
    accumulator = PrototypeAccumulator(net.num_channels, net.config.feature_dim, device)
    for volume in volumes:
        for image, label, valid in iterate_tiles(volume["image"], volume["label"], patch_size):
            image, label, valid = image.to(device), label.to(device), valid.to(device)
            with autocast(device, amp):
                logits, features = net.forward_with_features(image)
            targets = label if targets_of is None else targets_of(image, label)
            accumulator.add(features.float(), torch.where(valid, targets, torch.full_like(targets, IGNORE)))
    net.train(was_training)
    accumulator.reduce_across_ranks()
    return accumulator.result()


# An imported model's prediction counts as a prototype target where its probability is at least this
# (docs/method.md: prototypes of an imported model).
CONFIDENCE = 0.9


@torch.no_grad()
def confident_prototypes(
    net: torch.nn.Module, images: list[torch.Tensor], patch_size, device: torch.device,
    confidence: float = CONFIDENCE, amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global prototypes of a model that came without labelled data (an imported one): over unlabelled
    model-space ``images`` ``(1, X, Y, Z)``, each voxel's target is the model's own predicted channel where
    its softmax probability is at least ``confidence``, and no target elsewhere.

    Returns ``(C, D)`` prototypes and the ``(C,)`` mask of channels predicted confidently somewhere.
    """
    from cimis.device import autocast
    from cimis.infer import iterate_tiles

    was_training = net.training
    net.eval()
    accumulator = None
    for image in images:
        for tile, _, valid in iterate_tiles(image, None, patch_size):
            tile, valid = tile.to(device), valid.to(device)
            with autocast(device, amp):
                logits, features = net.forward_with_features(tile)
            if accumulator is None:
                accumulator = PrototypeAccumulator(logits.shape[1], features.shape[1], features.device)
            probability, channel = torch.softmax(logits.float(), 1).max(1)
            keep = valid & (probability >= confidence)
            accumulator.add(features.float(), torch.where(keep, channel, torch.full_like(channel, IGNORE)))
    net.train(was_training)
    if accumulator is None:
        raise CimisError("no image to compute prototypes from")
    return accumulator.result()
