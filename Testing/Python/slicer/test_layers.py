"""Imports point one way: widget -> bridge -> engine. The engine never imports Slicer, VTK or Qt; the bridge
never imports Qt; only the module file does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LOGIC = Path(__file__).resolve().parents[3] / "CIMISLearner" / "Logic"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package, forbidden", [("cimis", {"slicer", "vtk", "vtkmodules", "qt", "ctk", "cimis_slicer"}),
                                                ("cimis_slicer", {"qt", "ctk", "PythonQt"})])
def test_layers_import_one_way(package, forbidden):
    files = sorted((LOGIC / package).rglob("*.py"))
    assert files
    offending = {str(f.relative_to(LOGIC)): sorted(_imported_roots(f) & forbidden) for f in files}
    assert {k: v for k, v in offending.items() if v} == {}
