"""Give a Slicer segment the standard terminology entry of its organ (the code table is the engine's)."""

from __future__ import annotations

from cimis.data.terminology import ORGAN_CODES, organ_and_side, terminology_entry

__all__ = ["ORGAN_CODES", "organ_and_side", "set_terminology", "terminology_entry"]


def set_terminology(segment, name: str) -> bool:
    """Give a ``vtkSegment`` the standard entry of the organ ``name``; False (segment unchanged) when the
    name is not in the table."""
    entry = terminology_entry(name)
    if entry is None:
        return False
    segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
    return True
