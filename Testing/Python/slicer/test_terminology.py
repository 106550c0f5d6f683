"""Segments carry the standard (SNOMED CT) code of their organ, whatever the dataset calls it."""

from __future__ import annotations

import numpy as np
import pytest

from cimis.data.classes import ClassSet
from cimis_slicer.segments import add_new_structures, import_label_array, segments_of
from cimis_slicer.terminology import organ_and_side, terminology_entry


@pytest.mark.parametrize("name, organ, side", [
    ("right kidney", "kidney", "right"), ("kidney_right", "kidney", "right"), ("kidney_L", "kidney", "left"),
    ("Adrenal gland (left)", "adrenal gland", "left"), ("spleen", "spleen", None),
    ("portal vein and splenic vein", "portal vein and splenic vein", None), ("head of left femur", "head of femur", "left"),
])
def test_dataset_spellings_reduce_to_one_organ_and_side(name, organ, side):
    assert organ_and_side(name) == (organ, side)


def test_entries_use_slicers_format_and_only_known_codes():
    fields = terminology_entry("kidney_R").split("~")
    assert fields == ["Segmentation category and type - DICOM master list", "SCT^123037004^Anatomical Structure",
                      "SCT^64033007^Kidney", "SCT^24028007^Right", "Anatomic codes - DICOM master list", "^^", "^^"]
    assert terminology_entry("Liver").split("~")[2:4] == ["SCT^10200004^Liver", "^^"]
    # A name the table does not know gets no code rather than a guessed one; so does a femur *head*.
    assert terminology_entry("my tumour") is None and terminology_entry("head of right femur") is None


def test_imported_and_new_segments_carry_their_organ_code(context, ct, phantom_files):
    labels, classes = phantom_files["labels"], phantom_files["classes"]
    kept = ClassSet([classes.by_name("spleen"), classes.by_name("right kidney")])
    result = np.where(np.isin(labels, kept.values), labels, 0).astype(np.uint8)
    segmentation = import_label_array(context, result, ct, kept, "CT segmentation")
    painted = add_new_structures(context, ct, ["pancreas", "my lesion"], kept)

    def entry(node, name):
        segment_id = next(s.id for s in segments_of(node) if s.name == name)
        return node.GetSegmentation().GetSegment(segment_id).GetTerminology()

    assert "SCT^78961009^Spleen~^^" in entry(segmentation, "spleen")
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in entry(segmentation, "right kidney")
    assert "SCT^15776009^Pancreas" in entry(painted, "pancreas")
    assert "Pancreas" not in entry(painted, "my lesion") and "SCT^85756007^Tissue" in entry(painted, "my lesion")
