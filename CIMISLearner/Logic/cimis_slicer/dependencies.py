"""What CIMISLearner needs installed in Slicer's Python, checked without importing it.

The widget calls :func:`missing_requirements` on first use; if something is missing it asks the user and
installs the list with ``slicer.util.pip_install``. torch is the PyTorch extension's business (its own
installer picks the right CUDA build), so it is reported separately, never pip-installed here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent.parent / "Resources" / "requirements.txt"


@dataclass
class InstallPlan:
    requirements: list[str] = field(default_factory=list)  # pip requirement strings to install
    torch_missing: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not self.requirements and not self.torch_missing

    def question(self) -> str:
        """What the widget asks before installing."""
        lines = []
        if self.requirements:
            lines.append("CIMISLearner needs these Python packages in Slicer: " + ", ".join(self.requirements)
                         + ". Install them now (a few minutes, needs the internet)?")
        if self.torch_missing:
            lines.append("PyTorch is not installed: install the PyTorch extension (Extensions Manager) and use "
                         "its PyTorch Utils module to install torch.")
        return "\n".join(lines)


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def missing_requirements(path: Path = REQUIREMENTS_FILE) -> InstallPlan:
    """The requirements that are absent or older than required, and whether torch is absent."""
    plan = InstallPlan(torch_missing=importlib.util.find_spec("torch") is None)
    for requirement in read_requirements(path):
        if not _satisfied(requirement):
            plan.requirements.append(requirement)
    return plan


def _satisfied(requirement: str) -> bool:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?", requirement)
    if match is None:
        return False  # a form we do not understand: let pip decide
    name, minimum = match.groups()
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return minimum is None or _version_tuple(installed) >= _version_tuple(minimum)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)
