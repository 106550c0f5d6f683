"""The check a learn job makes before its new version may go live, on what the clinician has.

* New organs: Dice of the new version's prediction against the painted label, on the volumes marked for
  validation (the ``val`` split of the job's cases).
* Old organs: with no labels for them, the agreement (Dice) between the old and the new version's
  predictions on every painted volume, a label-free estimate of forgetting: an old organ the new version
  no longer finds where the old one did scores low.

Scores are pooled over the volumes (twice the summed overlaps over the summed sizes), so an organ absent
from one volume does not count as a perfect or a failed case; an organ absent everywhere scores None. The
result goes into the new version's summary (``summary.json``, key ``check``) and the worker's done event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cimis.data.classes import ClassSet
from cimis.data.manifest import Manifest, load_case


class _Pooled:
    """Sums for one organ's pooled Dice."""

    def __init__(self):
        self.overlap = self.size = 0
        self.volumes = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.overlap += int(np.count_nonzero(a & b))
        self.size += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        self.volumes += 1

    def dice(self) -> float | None:
        return 2.0 * self.overlap / self.size if self.size else None


def score_new_version(old_model: Path, new_model: Path, manifest: Manifest, new_classes: ClassSet,
                      device: str, segment: Callable, between_volumes: Callable[[], None] = lambda: None) -> dict:
    """Scores of the new version (folder ``new_model``) against the old one (``old_model``).

    ``segment(net, card, image) -> labels array`` runs one model on one image (the worker passes its
    out-of-memory-aware inference); ``between_volumes`` runs before each volume (cancellation checks).
    """
    import SimpleITK as sitk

    from cimis.model.modelfile import load_model

    old_net, old_card = load_model(old_model, device)
    new_net, new_card = load_model(new_model, device)
    validation = set(manifest.splits.get("val", []))
    cases = manifest.cases_in("train") + manifest.cases_in("val")
    new_scores = {c.name: _Pooled() for c in new_classes}
    old_scores = {c.name: _Pooled() for c in old_card.classes}
    for case in cases:
        between_volumes()
        image, label = load_case(case, manifest.classes)
        new_pred = segment(new_net, new_card, image)
        old_pred = segment(old_net, old_card, image)
        for organ in old_card.classes:
            old_scores[organ.name].add(old_pred == organ.value, new_pred == new_card.classes.by_name(organ.name).value)
        if case.id in validation and label is not None:
            painted = sitk.GetArrayViewFromImage(label)
            for organ in new_classes:
                new_scores[organ.name].add(new_pred == new_card.classes.by_name(organ.name).value,
                                           painted == manifest.classes.by_name(organ.name).value)
    return {
        "new_organs": {name: {"dice": s.dice(), "volumes": s.volumes} for name, s in new_scores.items()},
        "old_organs": {name: {"agreement": s.dice(), "volumes": s.volumes} for name, s in old_scores.items()},
        "validation_volumes": len([c for c in cases if c.id in validation]),
        "volumes": len(cases),
    }
