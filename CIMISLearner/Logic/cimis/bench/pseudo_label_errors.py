"""How often the old model's pseudo-labels are wrong on a step's volumes (the regime PGCD is meant for).

The old model labels every voxel of the step's training volumes with METHOD.md section 3's rule (confident
old organ, ignored, or background), exactly as a step would; the result is compared with the full
reference restricted to what the old model knows. Only voxels whose true class the old model knows
(background or one of its organs) count: the step's new organs carry labels there and no pseudo-label.

Figures, over all counted voxels of the cases (``voxels`` of them):

- ``wrong``: the pseudo-label is a class (not ignored) and differs from the truth;
- ``ignored``: the old model predicts an organ without confidence (the step's loss skips the voxel);
- ``old_organ_wrong``: among voxels whose truth is an old organ, the share pseudo-labelled otherwise
  (another organ or background; ignored voxels not counted as wrong);
- ``organ_label_wrong``: among voxels pseudo-labelled as an old organ, the share whose truth differs.

``per_class`` gives, for each old organ, the share of its true voxels pseudo-labelled otherwise
(``missed``) or ignored (``ignored``), and the share of the voxels pseudo-labelled as it whose truth
differs (``label_wrong``): where the old model is right and where it is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from cimis.data.manifest import Manifest
from cimis.data.preprocess import model_space_transforms
from cimis.device import resolve_device
from cimis.incremental.prototypes import IGNORE
from cimis.incremental.pseudo_labels import EntropyThresholds, pseudo_label_targets
from cimis.infer import predict_probabilities
from cimis.model.modelfile import load_model
from cimis.train import LoadCased


def pseudo_label_errors(model_dir: str | Path, manifest: Manifest, split: str, device: str = "cpu",
                        entropy_floor: float = 0.001) -> dict:
    """The figures of the module docstring for the cases of ``split``, overall and per case.

    The entropy thresholds are estimated over the same cases, as a step estimates them over its data.
    """
    net, card = load_model(model_dir)
    torch_device = resolve_device(device)
    net = net.to(torch_device).eval()
    n_old = card.classes.num_channels
    prepare, to_model = reference_in_model_space(manifest, card)
    probabilities, truths, ids = [], [], []
    stats = EntropyThresholds(n_old, entropy_floor)
    for case in manifest.cases_in(split):
        volume = prepare({"case": case})
        with torch.no_grad():
            probs = predict_probabilities(net, volume["image"].as_tensor(), card.preprocessing.patch_size,
                                          torch_device, amp=False)
        stats.add(probs.unsqueeze(0))
        probabilities.append(probs)
        truths.append(torch.as_tensor(to_model[volume["label"][0].as_tensor().long().numpy()]))
        ids.append(case.id)
    thresholds = stats.thresholds()
    per_case, totals, by_class = {}, np.zeros(7), np.zeros((n_old, 5))
    for case_id, probs, truth in zip(ids, probabilities, truths):
        unlabelled = torch.zeros_like(truth)  # the step's label is 0 wherever the old model's classes lie
        targets = pseudo_label_targets(unlabelled.unsqueeze(0), probs.unsqueeze(0), thresholds, n_old)[0]
        counts = _counts(targets, truth)
        per_case[case_id] = _figures(counts)
        totals += counts
        by_class += _class_counts(targets, truth, n_old)
    per_class = {name: {"voxels": int(c[0]), "missed": _share(c[1], c[0]), "ignored": _share(c[2], c[0]),
                        "label_wrong": _share(c[4], c[3])}
                 for name, c in zip(card.classes.names, by_class[1:])}
    return {"split": split, "cases": len(ids), "model": str(model_dir), **_figures(totals), "per_class": per_class,
            "per_case": per_case}


def reference_in_model_space(manifest: Manifest, card) -> tuple[Compose, np.ndarray]:
    """A transform that loads a case into the model's space with its full reference, and the map from the
    reference's channels to the model's (``-1`` for classes the model does not know, so their voxels can be
    left out)."""
    prepare = Compose([LoadCased(manifest.classes, manifest.classes), model_space_transforms(card.preprocessing, True)])
    to_model = np.full(manifest.classes.num_channels, -1, dtype=np.int64)
    to_model[0] = 0
    for channel, cls in enumerate(manifest.classes, start=1):
        if cls.name in card.classes.names:
            to_model[channel] = card.classes.names.index(cls.name) + 1
    return prepare, to_model


def _class_counts(targets: torch.Tensor, truth: torch.Tensor, n_old: int) -> np.ndarray:
    """Per old channel: true voxels, of those mislabelled, of those ignored, voxels pseudo-labelled as it,
    of those wrong."""
    out = np.zeros((n_old, 5))
    known = truth >= 0
    for c in range(n_old):
        is_c, called_c = known & (truth == c), known & (targets == c)
        out[c] = [int(is_c.sum()), int((is_c & (targets != c) & (targets != IGNORE)).sum()),
                  int((is_c & (targets == IGNORE)).sum()), int(called_c.sum()), int((called_c & (truth != c)).sum())]
    return out


def _counts(targets: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Voxel counts: counted, wrong, ignored, truly an old organ, of those mislabelled, labelled an old
    organ, of those wrong."""
    known = truth >= 0
    ignored = known & (targets == IGNORE)
    labelled = known & ~ignored
    organ_truth = known & (truth > 0)
    organ_label = labelled & (targets > 0)
    mislabelled = labelled & (targets != truth)
    return np.array([int(known.sum()), int(mislabelled.sum()), int(ignored.sum()), int(organ_truth.sum()),
                     int((organ_truth & mislabelled).sum()), int(organ_label.sum()),
                     int((organ_label & mislabelled).sum())], dtype=np.float64)


def _share(part: float, whole: float) -> float | None:
    return float(part / whole) if whole else None


def _figures(counts: np.ndarray) -> dict:
    voxels, wrong, ignored, organ_truth, organ_missed, organ_label, organ_label_wrong = counts
    return {"voxels": int(voxels), "wrong": _share(wrong, voxels), "ignored": _share(ignored, voxels),
            "old_organ_wrong": _share(organ_missed, organ_truth),
            "organ_label_wrong": _share(organ_label_wrong, organ_label)}
