"""A learned version's pre-activation check, per organ, as the panel shows it before the clinician activates.

The worker scores a new version before publishing it (:mod:`cimis.version_check`) and records the numbers
in the version's summary (``check``): the new organs' Dice on volumes marked for validation, and for every
old organ the agreement between the old and the new version's predictions. Here they become rows; an old
organ whose agreement is below :data:`AGREEMENT_THRESHOLD` is flagged (the new version may have forgotten
it), and the panel asks before activating such a version.
"""

from __future__ import annotations

from dataclasses import dataclass

from cimis.registry import Registry

AGREEMENT_THRESHOLD = 0.8


@dataclass(frozen=True)
class OrganScore:
    name: str
    new: bool  # a class this version added (Dice against the painting) or an old one (agreement)
    score: float | None  # None: not measurable (no validation volume; organ absent in every volume)
    volumes: int
    flagged: bool

    def measure(self) -> str:
        return "Dice" if self.new else "agreement"

    def value_text(self) -> str:
        if self.score is not None:
            return f"{self.score:.2f}"
        return "no validation volume" if self.new and not self.volumes else "not found in the volumes"


@dataclass(frozen=True)
class VersionScores:
    organs: tuple[OrganScore, ...]
    threshold: float = AGREEMENT_THRESHOLD

    @classmethod
    def from_check(cls, check: dict, threshold: float = AGREEMENT_THRESHOLD) -> "VersionScores":
        organs = []
        for name, entry in check.get("new_organs", {}).items():
            organs.append(OrganScore(name, True, entry.get("dice"), int(entry.get("volumes", 0)), False))
        for name, entry in check.get("old_organs", {}).items():
            score = entry.get("agreement")
            organs.append(OrganScore(name, False, score, int(entry.get("volumes", 0)),
                                     score is not None and score < threshold))
        return cls(tuple(organs), threshold)

    @classmethod
    def of_version(cls, registry: Registry, version: str, threshold: float = AGREEMENT_THRESHOLD) -> "VersionScores | None":
        """The scores recorded in ``version``'s summary, or None for a version made without the check."""
        check = registry.summary(registry.resolve(version)).get("check")
        return cls.from_check(check, threshold) if isinstance(check, dict) else None

    @property
    def flagged(self) -> list[OrganScore]:
        return [o for o in self.organs if o.flagged]

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(organ, measure, value, flagged) per organ, new organs first, for the panel's table."""
        return [(o.name + (" (new)" if o.new else ""), o.measure(), o.value_text(), o.flagged) for o in self.organs]

    def summary(self) -> str:
        """One line for the status label."""
        new = "; ".join(f"{o.name} Dice {o.value_text()}" for o in self.organs if o.new)
        if self.flagged:
            old = (f"{len(self.flagged)} old organ(s) below {self.threshold:.2f} agreement: "
                   + ", ".join(f"{o.name} {o.value_text()}" for o in self.flagged))
        else:
            old = f"every old organ agrees at {self.threshold:.2f} or more"
        return f"{new}; {old}" if new else old

    def activation_question(self, version: str) -> str | None:
        """What to ask before activating ``version``: None when nothing is flagged."""
        if not self.flagged:
            return None
        names = ", ".join(f"{o.name} ({o.value_text()})" for o in self.flagged)
        return (f"The new version {version} agrees with the current one below {self.threshold:.2f} on: {names}. "
                "It may have forgotten these organs. Activate it anyway?")
