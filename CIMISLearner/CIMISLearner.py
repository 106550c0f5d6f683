"""CIMISLearner: teach a 3D CT segmentation model new organs without forgetting the old ones.

This module file is deliberately thin and the only file of the extension that imports Qt: the widget copies
its selectors into the Qt-free bridge (``Logic/cimis_slicer``: workflow, panel state, dependency plan) and
shows what it returns. Everything it does is reachable from, and tested through, that bridge.
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.util import VTKObservationMixin

# The engine and the bridge live beside this file.
_LOGIC_DIR = os.path.join(os.path.dirname(__file__), "Logic")
if _LOGIC_DIR not in sys.path:
    sys.path.insert(0, _LOGIC_DIR)

REGISTRY_SETTING = "CIMISLearner/Registry"
POLL_INTERVAL_MS = 500


class CIMISLearner(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CIMISLearner"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CIMISLearner developers"]
        self.parent.helpText = (
            "Segment a CT with the current model, paint only the new organs, press Learn: the model learns "
            "them in the background without forgetting the old organs (PGCD + DAPD, arXiv 2511.07749). "
            "See docs/user-guide.md."
        )
        self.parent.acknowledgementText = (
            "Method: Zhu et al., Class Incremental Medical Image Segmentation via Prototype-Guided Calibration "
            "and Dual-Aligned Distillation, arXiv 2511.07749. Built on MONAI, PyTorch and SimpleITK."
        )


@parameterNodeWrapper
class CIMISLearnerParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    newStructureNames: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    strategy: Annotated[str, Choice(["pgcd-dapd", "ft", "lwf", "ilt", "mib", "plop"])] = "pgcd-dapd"
    iterations: int = 0  # 0: the model's own default
    threads: int = 0  # 0: every core


class CIMISLearnerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.workflow = None
        self.lastMessage, self.lastFailed = "", False
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CIMISLearner.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CIMISLearnerLogic()

        self.ui.registryPathLineEdit.currentPath = qt.QSettings().value(REGISTRY_SETTING, "")
        self.ui.registryPathLineEdit.connect("currentPathChanged(QString)", self.onRegistryChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.activateButton.connect("clicked(bool)", self.onActivate)
        self.ui.versionsList.connect("itemSelectionChanged()", self.updateGUI)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.addStructuresButton.connect("clicked(bool)", self.onAddStructures)
        self.ui.learnButton.connect("clicked(bool)", self.onLearn)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.onRegistryChanged(self.ui.registryPathLineEdit.currentPath)

    def cleanup(self):
        self.timer.stop()
        if self.workflow is not None:
            self.workflow.shutdown()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    # ---------------------------------------------------------------------------------------- registry
    def onRegistryChanged(self, path):
        qt.QSettings().setValue(REGISTRY_SETTING, path)
        self.workflow = self.logic.workflowFor(path) if path else None
        self.refreshVersions()

    def registryState(self):
        """(usable, message) for the panel."""
        from cimis.errors import CimisError

        if self.workflow is None:
            return False, "Choose a model registry (a folder of model versions), or import a model into an empty folder."
        try:
            self.workflow.model_classes()
            return True, ""
        except CimisError as exc:
            return False, exc.one_line()

    def refreshVersions(self):
        from cimis.errors import CimisError

        self.ui.versionsList.clear()
        if self.workflow is not None:
            try:
                for info in reversed(self.workflow.versions()):
                    text = f"{'* ' if info.active else '  '}{info.name}  {', '.join(info.classes)}  {info.note}"
                    item = qt.QListWidgetItem(text)
                    item.setData(qt.Qt.UserRole, info.name)
                    self.ui.versionsList.addItem(item)
            except CimisError:
                pass  # registryState() says what is wrong
        self.updateGUI()

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import a model", "", "Model archive (*.tar.gz);;All files (*)")
        if not path or not self.ui.registryPathLineEdit.currentPath:
            return
        self.run(lambda: self.logic.importModel(self.ui.registryPathLineEdit.currentPath, path))
        self.onRegistryChanged(self.ui.registryPathLineEdit.currentPath)

    def onActivate(self):
        item = self.ui.versionsList.currentItem()
        if item is not None and self.workflow is not None:
            version = item.data(qt.Qt.UserRole)
            if self.run(lambda: self.workflow.activate(version)):
                self.setMessage(f"{version} is now the active version.")
            self.refreshVersions()

    # ------------------------------------------------------------------------------------------ actions
    def settings(self):
        from cimis_slicer.workflow import JobSettings

        p = self._parameterNode
        return JobSettings(device=p.device, strategy=p.strategy, iterations=p.iterations or None,
                           threads=p.threads or None)

    def onSegment(self):
        if self.ensureDependencies() and self.run(lambda: self.workflow.segment([self._parameterNode.inputVolume],
                                                                                  self.settings())):
            self.startPolling()

    def onAddStructures(self):
        from cimis_slicer.context import SlicerContext
        from cimis_slicer.panel import parse_structure_names
        from cimis_slicer.segments import add_new_structures

        p = self._parameterNode
        names = parse_structure_names(p.newStructureNames)

        def add():
            node = add_new_structures(SlicerContext.running_slicer(), p.inputVolume, names,
                                      self.workflow.model_classes())
            p.segmentation = node
            self.setMessage(f"Added {', '.join(names)}: paint them in the Segment Editor, then press Learn.")

        self.run(add)

    def onLearn(self):
        from cimis_slicer.workflow import LearnCase

        p = self._parameterNode
        if self.ensureDependencies() and self.run(
                lambda: self.workflow.learn([LearnCase(p.inputVolume, p.segmentation)], self.settings())):
            self.startPolling()

    def onCancel(self):
        if self.workflow is not None:
            self.workflow.cancel()

    def startPolling(self):
        self.lastMessage, self.lastFailed = "", False
        self.ui.progressBar.value = 0
        self.timer.start()
        self.updateGUI()

    def onPoll(self):
        status = self.workflow.poll() if self.workflow is not None else None
        if status is not None and status.iteration is not None and status.total:
            self.ui.progressBar.maximum = status.total
            self.ui.progressBar.value = status.iteration
        if self.workflow is None or not self.workflow.busy:
            self.timer.stop()
            if status is not None:
                failed = status.state != "done"
                self.setMessage(status.message if failed else self.workflow.outcome.message, failed)
            self.refreshVersions()
        self.updateGUI(status)

    def ensureDependencies(self):
        """First use: install what the engine needs into Slicer's Python, after asking."""
        from cimis_slicer.dependencies import missing_requirements

        plan = missing_requirements()
        if plan.nothing_to_do:
            return True
        if plan.requirements and slicer.util.confirmOkCancelDisplay(plan.question(), "CIMISLearner"):
            with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
                slicer.util.pip_install(plan.requirements)
            plan = missing_requirements()
        if plan.torch_missing:
            slicer.util.warningDisplay(plan.question(), "CIMISLearner")
        return plan.nothing_to_do

    def run(self, action):
        """Run an action; a CimisError becomes the status line, never a traceback. True if it succeeded."""
        from cimis.errors import CimisError

        try:
            action()
            return True
        except CimisError as exc:
            self.setMessage(exc.one_line(), failed=True)
            return False

    def setMessage(self, message, failed=False):
        self.lastMessage, self.lastFailed = message, failed
        self.updateGUI()

    # ------------------------------------------------------------------------------------------- state
    def updateGUI(self, caller=None, event=None):
        from cimis_slicer.panel import PanelInputs, panel_view

        if not hasattr(self, "ui") or self._parameterNode is None:
            return
        p = self._parameterNode
        registryOk, registryMessage = self.registryState()
        running = self.workflow is not None and self.workflow.busy
        task = self.workflow.task if running else None
        item = self.ui.versionsList.currentItem()
        view = panel_view(PanelInputs(
            registry_ok=registryOk, registry_message=registryMessage, volume_selected=p.inputVolume is not None,
            segmentation_selected=p.segmentation is not None, new_structure_names=p.newStructureNames,
            job_running=running, job_kind=task.kind if task else "",
            job_status=task.process.status.describe() if task else "", last_message=self.lastMessage,
            last_failed=self.lastFailed, version_selected=item is not None and not item.text().startswith("*")))
        self.ui.segmentButton.enabled = view.segment_enabled
        self.ui.addStructuresButton.enabled = view.add_structures_enabled
        self.ui.learnButton.enabled = view.learn_enabled
        self.ui.cancelButton.enabled = view.cancel_enabled
        self.ui.activateButton.enabled = view.activate_enabled
        self.ui.settingsCollapsibleButton.enabled = view.settings_enabled
        self.ui.progressBar.visible = running
        self.ui.statusLabel.text = view.status
        self.ui.statusLabel.styleSheet = "color: #c0392b" if view.status_is_error else ""


class CIMISLearnerLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue only: the parameter node and where job folders live; the behaviour is in cimis_slicer."""

    def getParameterNode(self):
        return CIMISLearnerParameterNode(super().getParameterNode())

    def workflowFor(self, registry):
        from cimis_slicer.context import SlicerContext
        from cimis_slicer.workflow import Workflow

        jobs = Path(slicer.app.temporaryPath) / "CIMISLearner" / "jobs"
        return Workflow(SlicerContext.running_slicer(), registry, jobs)

    def importModel(self, registry, source):
        from cimis.registry import Registry

        reg = Registry.open(registry, create=True)
        return reg.import_model(source, activate=reg.active_version() is None)


class CIMISLearnerTest(ScriptedLoadableModuleTest):
    """The bridge tests' full round, inside Slicer: ``Slicer --no-main-window --python-code
    "slicer.selfTests['CIMISLearner'](); slicer.util.exit()"``."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_full_round()

    def test_full_round(self):
        import tempfile

        from cimis.registry import Registry
        from cimis_slicer.context import SlicerContext
        from cimis_slicer.round_trip import BASE_CLASSES, NEW_CLASS, make_base_registry, run_round
        from cimis_slicer.segments import segments_of

        self.delayDisplay("Training a tiny base model, then Segment, paint, Learn, Segment again")
        with tempfile.TemporaryDirectory() as tmp:
            registry = make_base_registry(Path(tmp) / "base")
            result = run_round(SlicerContext.running_slicer(), Path(tmp) / "round", registry,
                               idle=lambda: slicer.app.processEvents() or qt.QThread.msleep(100))
            self.assertEqual(Registry(registry).active_version(), "v0002")
            self.assertEqual({s.name for s in segments_of(result.second)}, set(BASE_CLASSES) | {NEW_CLASS})
            self.assertEqual({s.name for s in segments_of(result.first)}, set(BASE_CLASSES))
        self.delayDisplay("Test passed")
