"""Incremental schedules (METHOD.md section 9): which classes each step learns, and in which order.

A schedule is written either in the "N-M" notation (N classes in step 0, then M new classes per step until
the class list is exhausted; the last step may carry fewer) or as an explicit grouping, steps separated by
"/" and classes by ",", each class given by name or label value: ``"spleen,liver,6/aorta/1,2"``.

The class order the "N-M" notation walks through is the dataset's label order, a seeded permutation of it
(``"seed:3"``), or an explicit comma-separated list of every class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cimis.data.classes import ClassSet
from cimis.errors import CimisError

_N_M = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_SEEDED = re.compile(r"^\s*seed\s*:\s*(\d+)\s*$")
DATASET_ORDER = "dataset"


@dataclass(frozen=True)
class Schedule:
    """The class names learned at each step: ``steps[0]`` by the base model, ``steps[t]`` by step ``t``."""

    steps: tuple[tuple[str, ...], ...]

    @property
    def step0(self) -> tuple[str, ...]:
        return self.steps[0]

    @property
    def later(self) -> tuple[str, ...]:
        """Every class added after step 0, in the order they are added."""
        return tuple(name for step in self.steps[1:] for name in step)

    def known_after(self, step: int) -> tuple[str, ...]:
        """The classes a model knows after ``step``: those of steps ``0..step``."""
        return tuple(name for s in self.steps[: step + 1] for name in s)

    def step_of(self, name: str) -> int:
        """The step at which class ``name`` is learned."""
        for t, step in enumerate(self.steps):
            if name in step:
                return t
        raise CimisError(f"class {name!r} is not in the schedule")

    def describe(self) -> str:
        return " + ".join(str(len(s)) for s in self.steps)


def class_order(classes: ClassSet, order: str = DATASET_ORDER) -> list[str]:
    """The class names in the order a "N-M" schedule takes them.

    ``order``: ``"dataset"`` (label order), ``"seed:K"`` (a permutation drawn with NumPy's generator seeded
    with K, the same on every machine), or every class listed by name or value, comma-separated.
    """
    names = classes.names
    text = (order or DATASET_ORDER).strip()
    if text.lower() == DATASET_ORDER:
        return list(names)
    seeded = _SEEDED.match(text.lower())
    if seeded:
        permutation = np.random.default_rng(int(seeded.group(1))).permutation(len(names))
        return [names[i] for i in permutation]
    listed = _resolve_names(classes, [t for t in text.split(",")], f"class order {order!r}")
    missing = [n for n in names if n not in listed]
    if missing:
        raise CimisError(f"class order {order!r} leaves out {missing}",
                         "list every class of the dataset once, or use 'dataset' or 'seed:K'")
    return listed


def parse_schedule(text: str, classes: ClassSet, order: str = DATASET_ORDER) -> Schedule:
    """The schedule ``text`` ("N-M" or an explicit grouping) over ``classes``, in ``order``."""
    if not text or not text.strip():
        raise CimisError("the schedule is empty", "write it as N-M (e.g. 7-3) or as groups like spleen,liver/aorta")
    n_m = _N_M.match(text)
    if n_m:
        return _n_m_schedule(int(n_m.group(1)), int(n_m.group(2)), class_order(classes, order), text.strip())
    if (order or DATASET_ORDER).strip().lower() != DATASET_ORDER:
        raise CimisError(f"an explicit grouping ({text!r}) already fixes the class order",
                         "leave out the class order, or use the N-M notation")
    groups = [g for g in text.split("/")]
    if len(groups) < 2:
        raise CimisError(f"schedule {text!r} has a single step", "an incremental schedule needs at least two steps, "
                         "e.g. 7-3 or spleen,liver/aorta")
    steps, seen = [], set()
    for i, group in enumerate(groups):
        names = _resolve_names(classes, group.split(","), f"step {i} of schedule {text!r}")
        if not names:
            raise CimisError(f"step {i} of schedule {text!r} has no class")
        repeated = [n for n in names if n in seen]
        if repeated:
            raise CimisError(f"schedule {text!r} learns {repeated} twice", "give every class to one step only")
        seen.update(names)
        steps.append(tuple(names))
    return Schedule(tuple(steps))


def _n_m_schedule(n: int, m: int, ordered: list[str], text: str) -> Schedule:
    total = len(ordered)
    if n < 1 or m < 1:
        raise CimisError(f"schedule {text!r} needs at least one class in step 0 and per step")
    if n >= total:
        raise CimisError(f"schedule {text!r} puts {n} of the dataset's {total} classes in step 0, "
                         "leaving none to learn incrementally", f"use N below {total}")
    steps = [tuple(ordered[:n])] + [tuple(ordered[i:i + m]) for i in range(n, total, m)]
    return Schedule(tuple(steps))


def _resolve_names(classes: ClassSet, tokens: list[str], where: str) -> list[str]:
    """Class names for tokens that are names (any case) or label values; refuses unknown and repeated ones."""
    by_value = {str(c.value): c.name for c in classes}
    by_name = {c.name.lower(): c.name for c in classes}
    names = []
    for token in (t.strip() for t in tokens):
        if not token:
            continue
        name = by_name.get(token.lower()) or by_value.get(token)
        if name is None:
            raise CimisError(f"{where}: unknown class {token!r}", f"known classes: {', '.join(classes.names)}")
        if name in names:
            raise CimisError(f"{where}: class {name!r} is listed twice")
        names.append(name)
    return names
