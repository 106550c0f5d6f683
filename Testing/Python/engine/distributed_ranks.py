"""One rank of test_distributed.py's torchrun run: the reductions of a data-parallel pgcd-dapd step.

``torchrun --standalone --nproc_per_node 2 distributed_ranks.py OUT``: every rank takes its sample of
:func:`fixed_batch`, computes the step's loss (Dice + CE on pseudo-labels, PGCD with both terms, DAPD)
through DDP, one dynamic background update, the pseudo-label thresholds and the global prototypes, and
writes them to ``OUT/rank{R}.pt``; the test compares them with one process on the whole batch
(:func:`single_step` there and here share the code).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cimis import distributed
from cimis.errors import CimisError
from cimis.incremental.dapd import DAPDLoss
from cimis.incremental.pgcd import PGCDLoss
from cimis.incremental.prototypes import PrototypeAccumulator, PrototypeBank
from cimis.incremental.pseudo_labels import EntropyThresholds, pseudo_label_targets
from cimis.seg_loss import DiceCELoss

N_OLD, N_ALL, FEATURES = 5, 7, 4


class TinyNet(torch.nn.Module):
    """Two convolutions and a 1x1x1 head with SegmentationNet's interface (plain torch: the ranks start
    faster without MONAI)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv3d(8, FEATURES, 3, padding=1))
        self.head = torch.nn.Conv3d(FEATURES, num_channels, 1)

    def forward_with_features(self, x):
        features = self.backbone(x)
        return self.head(features), features


def fixed_batch() -> dict:
    """Two samples that differ in what they hold (sample 1 has no voxel of new class 6), so every count
    the losses divide by differs between the ranks."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 16, 16, 16, generator=g)
    labels = torch.randint(0, N_ALL, (2, 16, 16, 16), generator=g)
    labels[labels < N_OLD] = 0
    labels[1][labels[1] == 6] = 0
    torch.manual_seed(1)
    teacher = TinyNet(N_OLD).eval()
    with torch.no_grad():
        old_logits, old_features = teacher.forward_with_features(image)
    prototypes = torch.randn(N_OLD, FEATURES, generator=g)
    valid = torch.tensor([True, True, False, True, True])
    return {"image": image, "labels": labels, "old_logits": old_logits, "old_features": old_features,
            "prototypes": prototypes, "valid": valid}


def single_step(batch: dict, rows: slice) -> dict:
    """The step on ``batch[rows]`` in this process (under DDP when there are several ranks)."""
    part = {k: v[rows] if k in ("image", "labels", "old_logits", "old_features") else v for k, v in batch.items()}
    torch.manual_seed(0)
    net = TinyNet(N_ALL)
    student = distributed.data_parallel(net, torch.device("cpu"))
    logits, features = student(part["image"])
    stats = EntropyThresholds(N_OLD)
    stats.add(torch.softmax(part["old_logits"], 1))
    distributed.all_reduce_sum(stats.histograms)
    thresholds = stats.thresholds()
    targets = pseudo_label_targets(part["labels"], torch.softmax(part["old_logits"], 1), thresholds, N_OLD)
    seg = DiceCELoss()(logits, targets)
    pgcd, _ = PGCDLoss(lambda_f=1.0, lambda_o=1.0)(features, part["old_features"], logits, part["old_logits"],
                                                   part["labels"], part["prototypes"], part["valid"])
    dapd, _ = DAPDLoss(lambda_p=1.0)(features, part["old_features"], targets, part["prototypes"], part["valid"])
    loss = seg + pgcd + dapd
    loss.backward()
    bank = PrototypeBank(part["prototypes"], part["valid"], momentum=0.5)
    bank.update_background(part["old_features"], targets)
    accumulator = PrototypeAccumulator(N_ALL, FEATURES)
    accumulator.add(features.detach(), targets)
    accumulator.reduce_across_ranks()
    return {"loss": loss.detach(), "gradient": torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
            "thresholds": thresholds, "background": bank.prototypes[0].clone(),
            "prototypes": accumulator.result()[0]}


def main(out: Path) -> None:
    with distributed.process_group("cpu"):
        rank = distributed.rank()
        result = single_step(fixed_batch(), slice(rank, rank + 1))
        try:  # ranks holding different "replicas" are refused
            distributed.check_replicas_agree([torch.tensor([float(rank)])], "test values")
            result["disagreement_refused"] = False
        except CimisError:
            result["disagreement_refused"] = True
        result["world_size"] = distributed.world_size()
        torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
