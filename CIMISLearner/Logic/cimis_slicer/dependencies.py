"""What CIMISLearner needs installed in Slicer's Python, checked from package metadata without importing it.

The order is the one Slicer's AI extensions use (SlicerTotalSegmentator, SlicerMONAIAuto3DSeg): torch first,
through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch`` with
:data:`TORCH_REQUIREMENT`: it picks the CUDA build that matches the GPU driver), then the rest of
``Resources/requirements.txt`` with pip, pinned to the torch just installed so that pip can never replace it
with a default build from the index. Packages Slicer ships itself (:data:`SHIPPED_WITH_SLICER`) are never
pip-installed, even when listed.

Every action that needs the engine calls :func:`require_engine` first: on a fresh Slicer it raises a
:class:`CimisError` naming what is missing (the status line shows it) instead of importing torch on the
GUI thread.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

from cimis.errors import CimisError

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent.parent / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.0"  # pyproject.toml's minimum
SHIPPED_WITH_SLICER = ("numpy", "simpleitk", "vtk")  # pip-installing these would break Slicer


@dataclass
class InstallPlan:
    torch: str = ""  # why torch must be installed first ("missing", "1.13.1 is older than 2.0"), or ""
    requirements: list[str] = field(default_factory=list)  # pip requirement strings, installed after torch

    @property
    def torch_needed(self) -> bool:
        return bool(self.torch)

    @property
    def nothing_to_do(self) -> bool:
        return not self.requirements and not self.torch_needed

    def missing_names(self) -> list[str]:
        return (["torch"] if self.torch_needed else []) + [_name_of(r) for r in self.requirements]

    def status_line(self) -> str:
        """The panel's one line while something is missing."""
        return (f"Missing Python packages in Slicer: {', '.join(self.missing_names())}. "
                "Accept the install when asked (torch comes from the PyTorch extension).")

    def question(self) -> str:
        """What the widget asks before installing anything."""
        lines = ["CIMISLearner needs these Python packages in Slicer:"]
        if self.torch_needed:
            lines.append(f"- PyTorch (torch{TORCH_REQUIREMENT}; {self.torch}), installed by the PyTorch extension, "
                         "which chooses the GPU (CUDA) or CPU build for this computer")
        if self.requirements:
            lines.append("- then with pip: " + ", ".join(self.requirements))
        lines.append("Install them now? This takes a few minutes and needs the internet.")
        return "\n".join(lines)

    def pip_arguments(self) -> list[str]:
        """The pip requirements for after torch, with the installed torch pinned (its local version, such as
        ``+cu121``, included) so that MONAI's own torch requirement cannot make pip fetch another build."""
        if not self.requirements:
            return []
        torch = installed_version("torch")
        return list(self.requirements) + ([f"torch=={torch}"] if torch else [])


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def missing_requirements(path: Path = REQUIREMENTS_FILE) -> InstallPlan:
    """torch's state and the requirements that are absent or older than required (never Slicer's own)."""
    plan = InstallPlan(torch=_torch_problem())
    for requirement in read_requirements(path):
        if _name_of(requirement).lower() in SHIPPED_WITH_SLICER or _name_of(requirement).lower() == "torch":
            continue
        if not _satisfied(requirement):
            plan.requirements.append(requirement)
    return plan


def require_engine(action: str) -> None:
    """Raise a one-line :class:`CimisError` naming the missing packages when ``action`` cannot run yet."""
    plan = missing_requirements()
    if not plan.nothing_to_do:
        raise CimisError(f"{action} needs Python packages that are not installed in Slicer: "
                         f"{', '.join(plan.missing_names())}",
                         "accept the install CIMISLearner offers (torch through the PyTorch extension, then the rest)")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_problem() -> str:
    version = installed_version("torch")
    if version is None:
        return "not installed"
    minimum = TORCH_REQUIREMENT.lstrip(">=")
    if _version_tuple(version) < _version_tuple(minimum):
        return f"{version} is older than {minimum}"
    return ""


def _name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def _satisfied(requirement: str) -> bool:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?", requirement)
    if match is None:
        return False  # a form we do not understand: let pip decide
    name, minimum = match.groups()
    installed = installed_version(name)
    if installed is None:
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
