"""What can be checked of the extension without a Slicer build: the Extensions Index entry as the index's
checks want it (schema keys, prettier's layout), and every widget the module file uses exists in its .ui."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_extensions_index_entry_is_formatted_as_the_index_lints_it():
    text = (ROOT / "CIMISLearner.json").read_text(encoding="utf-8")
    entry = json.loads(text)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert {"build_dependencies", "category", "scm_revision", "scm_url", "tier"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch"]
    # prettier (the index's pre-commit hook): two-space indent, short arrays inline, one final newline.
    lines = [f'  "{key}": {json.dumps(value)}' for key, value in entry.items()]
    assert text == "{\n" + ",\n".join(lines) + "\n}\n"


def test_every_widget_the_module_uses_is_in_its_ui_file():
    module = (ROOT / "CIMISLearner" / "CIMISLearner.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.([A-Za-z]\w*)", module))
    tree = ElementTree.parse(ROOT / "CIMISLearner" / "Resources" / "UI" / "CIMISLearner.ui")
    defined = {w.get("name") for w in tree.iter("widget")}
    assert used and not used - defined, f"missing in the .ui: {sorted(used - defined)}"
    parameters = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    declared = set(re.findall(r"^    (\w+): ", module.split("class CIMISLearnerParameterNode")[1].split("class ")[0],
                              re.MULTILINE))
    assert parameters <= declared


def test_the_panel_offers_every_incremental_strategy_of_the_engine():
    # The bridge cannot import the engine before the dependency step, so it keeps its own list: keep it in step.
    from cimis.incremental.strategies import STRATEGIES as ENGINE
    from cimis_slicer.workflow import STRATEGIES as BRIDGE

    incremental = [name for name, cls in ENGINE.items() if not getattr(cls, "fresh_start", False)]
    assert sorted(BRIDGE) == sorted(incremental)
    module = (ROOT / "CIMISLearner" / "CIMISLearner.py").read_text(encoding="utf-8")
    choice = re.search(r"strategy: Annotated\[str, Choice\((\[.*?\])\)\]", module)
    assert choice and sorted(json.loads(choice.group(1))) == sorted(incremental)


def test_the_module_installs_every_resource_it_uses_and_registers_the_sample_ct_at_startup():
    from cimis_slicer.sample_data import SAMPLE_FILES, THUMBNAIL

    cmake = (ROOT / "CIMISLearner" / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_RESOURCES\s+(.*?)\)", cmake, re.DOTALL).group(1)
    installed = set(block.replace("${MODULE_NAME}", "CIMISLearner").split())
    wanted = {f"Resources/{f.relative_path}" for f in SAMPLE_FILES} | {f"Resources/{THUMBNAIL}"}
    assert not wanted - installed, f"not installed by CIMISLearner/CMakeLists.txt: {sorted(wanted - installed)}"
    assert all((ROOT / "CIMISLearner" / path).is_file() for path in installed), sorted(installed)
    module = (ROOT / "CIMISLearner" / "CIMISLearner.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in module
    assert re.search(r"def registerSampleData\(\):.*?register_sample_data\(SampleData\.SampleDataLogic, ", module,
                     re.DOTALL)
