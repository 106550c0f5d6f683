"""Evaluation of predicted label maps against references: per-class Dice (and HD95) and their means."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from cimis.data.classes import ClassSet
from cimis.data.io import read_image
from cimis.data.manifest import Manifest, load_case
from cimis.data.validation import check_label_values, check_same_geometry
from cimis.errors import CimisError
from cimis.metrics import CaseMetrics, EvaluationReport, evaluate_case


def compare_label_maps(pred: sitk.Image, ref: sitk.Image, classes: ClassSet, case_id: str, hd95: bool,
                       pred_path: str = "prediction", ref_path: str = "reference") -> CaseMetrics:
    """Metrics of one predicted label map (class values) against its reference on the same grid."""
    check_same_geometry(ref, pred, ref_path, pred_path)
    pred_values = sitk.GetArrayFromImage(pred)
    check_label_values(pred_values, classes, pred_path)
    # SimpleITK arrays are (z, y, x): reverse the spacing to match.
    return evaluate_case(pred_values, sitk.GetArrayFromImage(ref), tuple(ref.GetSpacing()[::-1]), classes,
                         case_id, hd95=hd95)


def evaluate_folder(manifest_path: str | Path, split: str, predictions: str | Path, hd95: bool = False) -> EvaluationReport:
    """Evaluate ``predictions/CASE_ID.nii.gz`` (as written by ``cimis segment --manifest``) for every case
    of a manifest split."""
    manifest = Manifest.load(manifest_path)
    predictions = Path(predictions)
    cases = manifest.cases_in(split)
    if not cases:
        raise CimisError(f"split {split!r} of {manifest_path} has no cases")
    results = []
    for case in cases:
        pred_path = predictions / f"{case.id}.nii.gz"
        if not pred_path.is_file():
            raise CimisError(f"no prediction for case {case.id}: {pred_path} is missing",
                             f"run cimis segment --manifest {manifest_path} --split {split} --output {predictions}")
        _, ref = load_case(case, manifest.classes)
        if ref is None:
            raise CimisError(f"case {case.id} has no reference label map to evaluate against")
        results.append(compare_label_maps(read_image(pred_path), ref, manifest.classes, case.id, hd95,
                                          str(pred_path), str(case.label)))
    return EvaluationReport(manifest.classes, results)


def classes_from(path: str | Path) -> ClassSet:
    """The class list of a model folder or of a manifest file."""
    path = Path(path)
    if path.is_dir():
        from cimis.model.modelfile import load_card

        return load_card(path).classes
    return Manifest.load(path).classes


def evaluate_pair(pred_path: str | Path, ref_path: str | Path, classes_source: str | Path, hd95: bool = False) -> EvaluationReport:
    """Evaluate one predicted label map against one reference, with the classes of a model or manifest."""
    classes = classes_from(classes_source)
    ref = read_image(ref_path)
    check_label_values(sitk.GetArrayViewFromImage(ref), classes, str(ref_path))
    result = compare_label_maps(read_image(pred_path), ref, classes, Path(pred_path).name.split(".")[0], hd95,
                                str(pred_path), str(ref_path))
    return EvaluationReport(classes, [result])
