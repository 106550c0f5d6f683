"""Segmentation classes: names, label values and colours, and the built-in BTCV and WORD lists.

A model's output channel ``i`` (``i >= 1``) is the ``i``-th class of its :class:`ClassSet`; channel 0 is
always background (label value 0). Label values on disk may be any positive integers; the class set maps
them to contiguous channel indices and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from cimis.errors import CimisError

Color = tuple[int, int, int]

MAX_CLASS_VALUE = 65535
"""The largest class label value: label maps are stored as uint8 or uint16 (see :func:`label_dtype`)."""

# A qualitative palette close to Slicer's GenericAnatomyColors for abdominal organs; used when a class
# arrives without a colour.
_PALETTE: tuple[Color, ...] = (
    (157, 108, 162), (185, 102, 83), (185, 102, 83), (139, 150, 98), (211, 171, 143),
    (221, 130, 101), (216, 132, 105), (224, 97, 76), (0, 151, 206), (0, 112, 165),
    (249, 180, 111), (244, 214, 49), (220, 200, 40), (183, 156, 220), (204, 168, 143),
    (255, 253, 229), (111, 184, 210), (230, 158, 140), (152, 189, 207), (178, 212, 242),
)


def default_color(index: int) -> Color:
    """A distinct colour for the ``index``-th class (0-based), cycling through the palette."""
    return _PALETTE[index % len(_PALETTE)]


@dataclass(frozen=True)
class ClassInfo:
    """One foreground class: its display name, its integer value in label maps, and an RGB colour."""

    name: str
    value: int
    color: Color

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "color": list(self.color)}

    @staticmethod
    def from_json(entry: dict) -> "ClassInfo":
        if not isinstance(entry, dict):
            raise CimisError(f"a class entry is {type(entry).__name__} {str(entry)[:40]!r}, not an object",
                             "each class is an object with a name and an integer value")
        try:
            color = tuple(int(c) for c in entry.get("color", ())) or None
            return ClassInfo(str(entry["name"]), int(entry["value"]), color)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise CimisError(f"malformed class entry {str(entry)[:80]!r}", "each class needs a name and an integer value") from exc


def label_dtype(values: Iterable[int]) -> type:
    """The smallest unsigned integer type holding every label value in ``values`` (uint8 or uint16).

    Raises:
        CimisError: a value does not fit uint16 (it would wrap around and become another class).
    """
    top = max(values, default=0)
    if top > MAX_CLASS_VALUE:
        raise CimisError(f"label value {top} does not fit a label map (at most {MAX_CLASS_VALUE})",
                         "give the classes smaller label values")
    return np.uint8 if top < 256 else np.uint16


class ClassSet(Sequence[ClassInfo]):
    """An ordered list of foreground classes with unique names and unique positive label values.

    The order defines the output channels: ``classes[i]`` is channel ``i + 1``.
    """

    def __init__(self, classes: Iterable[ClassInfo]):
        items = []
        for i, c in enumerate(classes):
            color = c.color if c.color else default_color(i)
            items.append(ClassInfo(c.name.strip(), int(c.value), tuple(int(x) for x in color)))  # type: ignore[arg-type]
        self._items: tuple[ClassInfo, ...] = tuple(items)
        names = [c.name for c in self._items]
        values = [c.value for c in self._items]
        if any(not n for n in names):
            raise CimisError("a class has an empty name")
        if len(set(n.lower() for n in names)) != len(names):
            raise CimisError(f"class names must be unique, got {names}")
        if any(v <= 0 for v in values):
            raise CimisError(f"class label values must be positive integers (0 is background), got {values}")
        if any(v > MAX_CLASS_VALUE for v in values):
            raise CimisError(f"class label values must be at most {MAX_CLASS_VALUE}, got "
                             f"{[v for v in values if v > MAX_CLASS_VALUE][:10]}",
                             "give the classes smaller values (a case's label_map can send larger on-disk "
                             "values to them)")
        if len(set(values)) != len(values):
            raise CimisError(f"class label values must be unique, got {values}")

    # Sequence protocol
    def __getitem__(self, i):  # type: ignore[override]
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, ClassSet) and self._items == other._items

    def __repr__(self) -> str:
        return f"ClassSet({[c.name for c in self._items]})"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._items]

    @property
    def values(self) -> list[int]:
        return [c.value for c in self._items]

    @property
    def num_channels(self) -> int:
        """Output channels of a network for these classes: background plus one per class."""
        return len(self._items) + 1

    def by_name(self, name: str) -> ClassInfo:
        for c in self._items:
            if c.name.lower() == name.lower():
                return c
        raise CimisError(f"unknown class {name!r}", f"known classes: {', '.join(self.names)}")

    def subset(self, names_or_values: Iterable) -> "ClassSet":
        """The classes picked by name or label value, in this set's order."""
        wanted = {str(x).lower() for x in names_or_values}
        picked = [c for c in self._items if c.name.lower() in wanted or str(c.value) in wanted]
        if len(picked) != len(wanted):
            known = {c.name.lower() for c in picked} | {str(c.value) for c in picked}
            missing = sorted(w for w in wanted if w not in known)
            raise CimisError(f"unknown classes {missing}", f"known classes: {', '.join(self.names)}")
        return ClassSet(picked)

    def extended(self, new: Iterable[ClassInfo]) -> "ClassSet":
        """This set followed by ``new`` (the order of output channels after a head growth)."""
        new = list(new)
        colored = [
            c if c.color else ClassInfo(c.name, c.value, default_color(len(self._items) + i))
            for i, c in enumerate(new)
        ]
        return ClassSet(list(self._items) + colored)

    def value_to_channel_lut(self, max_value: int | None = None) -> np.ndarray:
        """Lookup table mapping a label value to its channel index; unknown values map to -1."""
        top = max([0, *self.values] + ([max_value] if max_value is not None else []))
        lut = np.full(top + 1, -1, dtype=np.int64)
        lut[0] = 0
        for i, v in enumerate(self.values):
            lut[v] = i + 1
        return lut

    def values_to_channels(self, label: np.ndarray) -> np.ndarray:
        """Label values -> channel indices. Raises :class:`CimisError` on values outside the class list."""
        label = np.asarray(label)
        found = np.unique(label)
        unknown = [int(v) for v in found if v != 0 and int(v) not in set(self.values)]
        if unknown:
            raise CimisError(
                f"label map has values {unknown[:10]} that are not in the class list {self.values}",
                "map them to a known class or to 0 (background)",
            )
        lut = self.value_to_channel_lut(int(found.max()) if found.size else 0)
        return lut[label.astype(np.int64)]

    def channels_to_values(self, channels: np.ndarray) -> np.ndarray:
        """Channel indices -> label values."""
        lut = np.array([0, *self.values], dtype=np.int64)
        return lut[np.asarray(channels, dtype=np.int64)]

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self._items]

    @staticmethod
    def from_json(entries: list[dict]) -> "ClassSet":
        if not isinstance(entries, list):
            raise CimisError("'classes' must be a list of {name, value, color} objects")
        return ClassSet(ClassInfo.from_json(e) for e in entries)

    @staticmethod
    def from_names(names: Sequence[str], first_value: int = 1) -> "ClassSet":
        return ClassSet(ClassInfo(n, first_value + i, None) for i, n in enumerate(names))  # type: ignore[arg-type]


BTCV_ORGANS = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
    "left adrenal gland",
)
WORD_ORGANS = (
    "liver", "spleen", "left kidney", "right kidney", "stomach", "gallbladder", "esophagus", "pancreas",
    "duodenum", "colon", "intestine", "adrenal", "rectum", "bladder", "head of left femur",
    "head of right femur",
)


def btcv_classes() -> ClassSet:
    """The 13 BTCV organs with their standard label values 1..13 (METHOD.md section 9)."""
    return ClassSet.from_names(BTCV_ORGANS)


def word_classes() -> ClassSet:
    """The 16 WORD organs with their standard label values 1..16 (METHOD.md section 9)."""
    return ClassSet.from_names(WORD_ORGANS)
