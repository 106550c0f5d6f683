"""First use on a fresh Slicer: nothing imports the engine (torch, MONAI) before the dependency step, the
install plan puts torch first through the PyTorch extension and never pip-installs what Slicer ships, and
an action that needs the engine says in one line what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from cimis_slicer.dependencies import SHIPPED_WITH_SLICER, InstallPlan, missing_requirements, read_requirements

LOGIC = Path(__file__).resolve().parents[3] / "CIMISLearner" / "Logic"
NOT_IN_FRESH_SLICER = ("torch", "functorch", "torchgen", "monai", "safetensors", "nibabel", "tqdm", "cimis",
                       "__editable__")

FRESH_SLICER_SCRIPT = r"""
import json, site, sys
site.addsitedir(sys.argv[1])
sys.path.insert(0, sys.argv[2])
# What the module's widget imports and calls before its dependency step: open a registry, list versions.
from cimis.errors import CimisError
from cimis_slicer.context import SlicerContext
from cimis_slicer.dependencies import missing_requirements
from cimis_slicer.panel import PanelInputs, panel_view
from cimis_slicer.workflow import Workflow
flow = Workflow(SlicerContext.standalone(), sys.argv[3], sys.argv[4])
versions = [v.name for v in flow.versions()]
plan = missing_requirements()
refusals = {}
for action, call in (("import", lambda: flow.import_model(sys.argv[5])), ("segment", lambda: flow.segment([None]))):
    try:
        call()
    except CimisError as exc:
        refusals[action] = exc.one_line()
# cimis.model.card_limits (with imported_limits, the bounds of imported networks) checks a card's fields with
# plain Python (no torch): the registry needs it.
torch_free = ("cimis.model", "cimis.model.card_limits", "cimis.model.imported_limits")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "safetensors", "nibabel", "tqdm")
               or (m.startswith(("cimis.model", "cimis.infer", "cimis.train", "cimis.incremental", "cimis.version_check"))
                   and m not in torch_free))
print(json.dumps({"versions": versions, "missing": plan.missing_names(), "torch": plan.torch,
                  "refusals": refusals, "heavy": heavy}))
"""


def _fresh_site_packages(tmp_path: Path) -> Path:
    """This environment's site-packages less the engine's packages: what a fresh Slicer has (its own numpy,
    SimpleITK, vtk and MRML classes, no torch or MONAI)."""
    import numpy

    source = Path(numpy.__file__).resolve().parents[1]
    fresh = tmp_path / "site-packages"
    fresh.mkdir()
    for entry in source.iterdir():
        if entry.name.lower().startswith(NOT_IN_FRESH_SLICER):
            continue
        (fresh / entry.name).symlink_to(entry)
    return fresh


def test_fresh_slicer_imports_no_engine_before_the_dependency_step(base_registry, tmp_path):
    fresh = _fresh_site_packages(tmp_path)
    run = subprocess.run([sys.executable, "-S", "-c", FRESH_SLICER_SCRIPT, str(fresh), str(LOGIC), str(base_registry),
                          str(tmp_path / "jobs"), str(tmp_path / "model.tar.gz")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["versions"] == ["v0001"]  # the registry is usable before anything is installed
    assert found["torch"] == "not installed" and found["missing"][:2] == ["torch", "monai"]
    assert found["heavy"] == []
    for action in ("import", "segment"):  # each says what is missing, in the status line's one sentence
        assert "torch" in found["refusals"][action] and "monai" in found["refusals"][action]
    assert "Import model needs" in found["refusals"]["import"]


def test_install_plan_never_pip_installs_what_slicer_ships(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=999\nSimpleITK>=999\nvtk\ntorch>=999\nmonai>=1.0  # present\n"
                            "no-such-package-cimis>=1\n")
    plan = missing_requirements(requirements)
    assert plan.requirements == ["no-such-package-cimis>=1"]  # never numpy, SimpleITK, vtk or torch by pip
    assert not plan.torch_needed  # this environment has torch>=2.0, the extension's requirement
    # After torch: pip gets the rest with the installed torch pinned, so MONAI cannot pull another build.
    args = plan.pip_arguments()
    assert args[0] == "no-such-package-cimis>=1" and args[-1].startswith("torch==")
    assert InstallPlan().nothing_to_do and InstallPlan().pip_arguments() == []


def test_torch_comes_first_and_the_question_says_how():
    plan = InstallPlan(torch="not installed", requirements=["monai>=1.5"])
    assert plan.missing_names() == ["torch", "monai"]
    question = plan.question()
    assert question.index("PyTorch") < question.index("monai") and "PyTorch extension" in question
    assert "torch, monai" in plan.status_line()


def test_shipped_requirements_name_nothing_slicer_ships_and_are_met_here():
    names = {r.split(">")[0].split("=")[0].strip().lower() for r in read_requirements()}
    assert not names & set(SHIPPED_WITH_SLICER) and "torch" not in names
    assert missing_requirements().nothing_to_do
