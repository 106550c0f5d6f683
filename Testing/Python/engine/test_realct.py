"""The real-CT story's survival table: each old organ's base Dice and the share each strategy keeps."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from cimis.data.classes import ClassInfo, ClassSet
from cimis.evaluate import compare_label_maps
from cimis.metrics import EvaluationReport
from cimis.realct import survival_table
from cimis.story import StoryResult

CLASSES = ClassSet([ClassInfo("liver", 1, None), ClassInfo("spleen", 2, None)])


def _report(prediction: np.ndarray, reference: np.ndarray) -> EvaluationReport:
    images = [sitk.GetImageFromArray(a.astype(np.uint8)) for a in (prediction, reference)]
    return EvaluationReport(CLASSES, [compare_label_maps(images[0], images[1], CLASSES, "case", hd95=False)])


def test_survival_is_each_strategys_dice_over_the_base_models():
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[:, :4, :4] = 1  # liver: 64 voxels
    reference[:, 4:, 4:] = 2  # spleen: 64 voxels
    half_liver = reference.copy()
    half_liver[:, :2, :4] = 0  # 32 of the 64 liver voxels lost: Dice 2*32/(32+64) = 2/3
    no_spleen = np.where(reference == 2, 0, reference)
    result = StoryResult(["liver", "spleen"], [], reports={
        "base": _report(reference, reference), "ft": _report(no_spleen, reference),
        "pgcd-dapd": _report(half_liver, reference)})

    table = survival_table(result)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[3:]}
    assert rows["liver"] == ["1.000", "1.000", "0.667"]
    assert rows["spleen"] == ["1.000", "0.000", "1.000"]
