"""CIMISLearner: teach a 3D CT segmentation model new organs without forgetting the old ones.

This module file is deliberately thin: the engine (``Logic/cimis``) and, later, the Slicer bridge
(``Logic/cimis_slicer``) hold all behaviour and are tested outside Slicer. It is the only file of the
extension that imports Qt.
"""

import os
import sys

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# The engine packages live beside this file.
_LOGIC_DIR = os.path.join(os.path.dirname(__file__), "Logic")
if _LOGIC_DIR not in sys.path:
    sys.path.insert(0, _LOGIC_DIR)


class CIMISLearner(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CIMISLearner"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CIMISLearner developers"]
        self.parent.helpText = (
            "Segment a CT with the current model, paint only the new organs, press Learn: the model learns "
            "them in the background without forgetting the old organs (PGCD + DAPD, arXiv 2511.07749)."
        )
        self.parent.acknowledgementText = (
            "Method: Zhu et al., Class Incremental Medical Image Segmentation via Prototype-Guided Calibration "
            "and Dual-Aligned Distillation, arXiv 2511.07749. Built on MONAI, PyTorch and SimpleITK."
        )


class CIMISLearnerWidget(ScriptedLoadableModuleWidget):
    """The full workflow widget arrives with the Slicer-module issue; for now it says what the engine is."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        label = qt.QLabel(
            "The CIMISLearner engine is installed. Use the `cimis` command (train, segment, evaluate); "
            "the interactive workflow follows in a later release."
        )
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)


class CIMISLearnerLogic(ScriptedLoadableModuleLogic):
    pass


class CIMISLearnerTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.test_engine_imports()

    def test_engine_imports(self):
        import cimis

        self.assertTrue(cimis.__version__)
