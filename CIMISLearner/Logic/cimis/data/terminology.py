"""Standard codes for the organs a model segments: SNOMED CT concepts for Slicer's terminology entry and DICOM SEG.

Slicer describes what a segment is by a terminology entry (the "TerminologyEntry" tag, shown in the
Segment Editor and written into DICOM SEG), not only by its free-text name. Names differ between datasets
("right kidney" in BTCV, "kidney_right" in TotalSegmentator, "kidney_R" in WORD); the entry does not. The
codes are SNOMED CT concepts from DICOM's anatomic and segmentation lists (CID 7150, 7151, 7152), the ones
Slicer's own terminology and the SlicerTotalSegmentator extension use. A name not in the table keeps
Slicer's default entry (and a generic code in DICOM SEG): a wrong code is worse than none. Plain data, no
slicer import: the engine's DICOM SEG writer and the Slicer bridge share it.
"""

from __future__ import annotations

import re

CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
SIDES = {"right": "SCT^24028007^Right", "left": "SCT^7771000^Left"}

# organ (lower case, words separated by one space, side removed) -> SNOMED CT code and meaning
ORGAN_CODES: dict[str, tuple[str, str]] = {
    "spleen": ("78961009", "Spleen"),
    "kidney": ("64033007", "Kidney"),
    "gallbladder": ("28231008", "Gallbladder"),
    "gall bladder": ("28231008", "Gallbladder"),
    "esophagus": ("32849002", "Esophagus"),
    "oesophagus": ("32849002", "Esophagus"),
    "liver": ("10200004", "Liver"),
    "stomach": ("69695003", "Stomach"),
    "aorta": ("15825003", "Aorta"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "ivc": ("64131007", "Inferior vena cava"),
    "portal vein": ("32764006", "Portal vein"),
    "portal vein and splenic vein": ("32764006", "Portal vein"),  # as SlicerTotalSegmentator codes it
    "pancreas": ("15776009", "Pancreas"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "adrenal": ("23451007", "Adrenal gland"),
    "duodenum": ("38848004", "Duodenum"),
    "colon": ("71854001", "Colon"),
    "small bowel": ("30315005", "Small Intestine"),
    "small intestine": ("30315005", "Small Intestine"),
    "bladder": ("89837001", "Bladder"),
    "urinary bladder": ("89837001", "Bladder"),
    "trachea": ("44567001", "Trachea"),
    "brain": ("12738006", "Brain"),
    "femur": ("71341001", "Femur"),
}
_SIDE_WORDS = {"right": "right", "r": "right", "left": "left", "l": "left"}


def organ_and_side(name: str) -> tuple[str, str | None]:
    """``"kidney_R"``, ``"Right kidney"``, ``"kidney (left)"`` -> ``("kidney", "right" | "left")``."""
    words = [w for w in re.split(r"[\s_\-(),]+", name.strip().lower()) if w]
    sides = {_SIDE_WORDS[w] for w in words if w in _SIDE_WORDS}
    organ = " ".join(w for w in words if w not in _SIDE_WORDS)
    return organ, (sides.pop() if len(sides) == 1 else None)


def terminology_entry(name: str) -> str | None:
    """The serialised terminology entry Slicer stores in a segment's "TerminologyEntry" tag, or None when
    the name is not a known organ. The format is Slicer's: context ~ category ~ type ~ type modifier ~
    anatomic context ~ anatomic region ~ region modifier, each code as ``scheme^value^meaning``."""
    organ, side = organ_and_side(name)
    code = ORGAN_CODES.get(organ)
    if code is None:
        return None
    modifier = SIDES[side] if side else "^^"
    return f"{CONTEXT}~{ANATOMICAL_STRUCTURE}~SCT^{code[0]}^{code[1]}~{modifier}~{ANATOMIC_CONTEXT}~^^~^^"

