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
KEEP_JOBS_SETTING = "CIMISLearner/KeepJobFolders"
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
        # The Sample Data module is loaded only once Slicer has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the module's sample CT (a synthetic abdomen and its organs) in the Sample Data module."""
    try:
        import SampleData
    except ModuleNotFoundError:  # the Sample Data module is turned off in the application settings
        return
    from cimis_slicer.sample_data import register_sample_data

    register_sample_data(SampleData.SampleDataLogic, Path(__file__).parent / "Resources")


@parameterNodeWrapper
class CIMISLearnerParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    newStructureNames: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    strategy: Annotated[str, Choice(["pgcd-dapd", "ft", "pseudo-labels", "lwf", "ilt", "mib", "plop"])] = "pgcd-dapd"
    iterations: int = 0  # 0: the model's own default
    threads: int = 0  # 0: every core


class CIMISLearnerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.workflow = None
        self.learnSet = []  # (volume node ID, segmentation node ID, validation) added with "Add to Learn set"
        self.lastMessage, self.lastFailed = "", False
        self.shownLogLines = 0
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
        self.workflow = self.logic.createWorkflow()
        self.ui.scoresTable.setColumnCount(3)
        self.ui.scoresTable.setHorizontalHeaderLabels(["Organ", "Measure", "Score"])
        self.ui.scoresTable.horizontalHeader().setStretchLastSection(True)

        self.ui.registryPathLineEdit.currentPath = qt.QSettings().value(REGISTRY_SETTING, "")
        self.ui.keepJobFoldersCheckBox.checked = self.logic.keepJobFolders()
        self.ui.registryPathLineEdit.connect("currentPathChanged(QString)", self.onRegistryChanged)
        self.ui.keepJobFoldersCheckBox.connect("toggled(bool)", self.onKeepJobFolders)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.trainFirstButton.connect("clicked(bool)", self.onTrainFirstModel)
        self.ui.activateButton.connect("clicked(bool)", self.onActivate)
        self.ui.exportVersionButton.connect("clicked(bool)", self.onExportVersion)
        self.ui.deleteVersionButton.connect("clicked(bool)", self.onDeleteVersion)
        self.ui.versionsList.connect("itemSelectionChanged()", self.updateGUI)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.addStructuresButton.connect("clicked(bool)", self.onAddStructures)
        self.ui.addToLearnSetButton.connect("clicked(bool)", self.onAddToLearnSet)
        self.ui.clearLearnSetButton.connect("clicked(bool)", self.onClearLearnSet)
        self.ui.learnButton.connect("clicked(bool)", self.onLearn)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.activateLearnedButton.connect("clicked(bool)", self.onActivateLearned)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.onRegistryChanged(self.ui.registryPathLineEdit.currentPath)

    def cleanup(self):
        self.timer.stop()
        self.workflow.shutdown()  # cancel file, then the worker's whole process tree; then the job folders go
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        self.workflow.scene_closing()  # a running Segment's result would have no volume to go on
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.learnSet = []
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
        if not self.run(lambda: setattr(self.workflow, "registry_path", path or None)):
            # Refused (a job runs on the current registry): show the registry the job belongs to again.
            current = str(self.workflow.registry_path or "")
            wasBlocked = self.ui.registryPathLineEdit.blockSignals(True)
            self.ui.registryPathLineEdit.currentPath = current
            self.ui.registryPathLineEdit.blockSignals(wasBlocked)
            return
        qt.QSettings().setValue(REGISTRY_SETTING, path)
        self.refreshVersions()

    def onKeepJobFolders(self, keep):
        qt.QSettings().setValue(KEEP_JOBS_SETTING, bool(keep))
        self.workflow.keep_job_folders = bool(keep)

    def registryState(self):
        """(usable, message) for the panel."""
        from cimis.errors import CimisError

        if self.workflow.registry_path is None:
            return False, "Choose a model registry (a folder of model versions), or an empty folder for a new one."
        try:
            self.workflow.model_classes()
            return True, ""
        except CimisError as exc:
            return False, exc.one_line()

    def refreshVersions(self):
        from cimis.errors import CimisError

        self.ui.versionsList.clear()
        try:
            for info in reversed(self.workflow.versions()):
                waiting = info.name == self.workflow.outcome.version and self.workflow.outcome.awaiting_activation
                text = (f"{'* ' if info.active else '  '}{info.name}  {', '.join(info.classes)}  {info.note}"
                        + ("  [new, not active yet]" if waiting else ""))
                item = qt.QListWidgetItem(text)
                item.setData(qt.Qt.UserRole, info.name)
                self.ui.versionsList.addItem(item)
        except CimisError:
            pass  # registryState() says what is wrong
        self.updateGUI()

    def selectedVersion(self):
        item = self.ui.versionsList.currentItem()
        return item.data(qt.Qt.UserRole) if item is not None else None

    def onImportModel(self):
        box = qt.QMessageBox(self.parent)
        box.setWindowTitle("Import a model")
        box.setText("Import a model archive (.tar.gz), or a model folder: a MONAI bundle, an nnU-Net v2 model or "
                    "a CIMISLearner model.")
        archiveButton = box.addButton("Archive...", qt.QMessageBox.AcceptRole)
        folderButton = box.addButton("Folder...", qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == archiveButton:
            path = qt.QFileDialog.getOpenFileName(self.parent, "Import a model", "",
                                                  "Model archive (*.tar.gz);;All files (*)")
        elif box.clickedButton() == folderButton:
            path = qt.QFileDialog.getExistingDirectory(self.parent, "Import a model folder")
        else:
            return
        if not path or not self.ensureDependencies():
            return
        chosen = {"classes": None}
        if not self.run(lambda: chosen.update(classes=self.chooseClasses(path))) or chosen["classes"] == []:
            return
        imported = {}
        if not self.run(lambda: imported.update(
                result=self.workflow.import_model(path, classes=chosen["classes"], settings=self.settings()))):
            return
        if self.workflow.busy:  # a bundle or nnU-Net model: the worker converts it
            self.startPolling()
        else:
            self.setMessage(f"Imported {imported['result']}.")
            self.refreshVersions()

    def chooseClasses(self, path):
        """The classes to keep of a bundle or nnU-Net model (None: all, or our own model); [] if cancelled."""
        from cimis_slicer.model_import import parse_kept_classes, source_classes

        offered = source_classes(path)
        if offered is None:
            return None
        text = qt.QInputDialog.getText(self.parent, "Classes to keep",
                                       f"The model has {len(offered)} classes. Keep (comma-separated):",
                                       qt.QLineEdit.Normal, ", ".join(offered))
        return parse_kept_classes(text, offered) if text else []

    def onActivate(self):
        version = self.selectedVersion()
        if version is not None and self.run(lambda: self.workflow.activate(version)):
            self.setMessage(f"{version} is now the active version.")
        self.refreshVersions()

    def onExportVersion(self):
        version = self.selectedVersion()
        if version is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export a model version", f"{version}.tar.gz",
                                              "Model archive (*.tar.gz)")
        if path and self.run(lambda: self.workflow.export_version(version, path)):
            self.setMessage(f"{version} written to {path}.")

    def onDeleteVersion(self):
        version = self.selectedVersion()
        if version is None or not slicer.util.confirmYesNoDisplay(f"Delete model version {version}?", "CIMISLearner"):
            return
        if self.run(lambda: self.workflow.delete_version(version)):
            self.setMessage(f"{version} deleted.")
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

    def onAddToLearnSet(self):
        p = self._parameterNode
        if p.inputVolume is None or p.segmentation is None:
            return
        entry = (p.inputVolume.GetID(), p.segmentation.GetID(), bool(self.ui.validationCheckBox.checked))
        self.learnSet = [e for e in self.learnSet if e[:2] != entry[:2]] + [entry]
        self.showLearnSet()

    def onClearLearnSet(self):
        self.learnSet = []
        self.showLearnSet()

    def showLearnSet(self):
        self.ui.learnSetList.clear()
        for volumeID, segmentationID, validation in self.learnSet:
            volume, segmentation = slicer.mrmlScene.GetNodeByID(volumeID), slicer.mrmlScene.GetNodeByID(segmentationID)
            if volume is not None and segmentation is not None:
                self.ui.learnSetList.addItem(f"{volume.GetName()} / {segmentation.GetName()}"
                                             + ("  (validation)" if validation else ""))
        self.updateGUI()

    def learnCases(self):
        """The Learn set, or else the selected volume and segmentation."""
        from cimis_slicer.workflow import LearnCase

        cases = [LearnCase(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s), validation)
                 for v, s, validation in self.learnSet]
        p = self._parameterNode
        return cases or [LearnCase(p.inputVolume, p.segmentation)]

    def onLearn(self):
        if self.ensureDependencies() and self.run(lambda: self.workflow.learn(self.learnCases(), self.settings())):
            self.startPolling()

    def onTrainFirstModel(self):
        if self.ensureDependencies() and self.run(
                lambda: self.workflow.train_first_model(self.learnCases(), self.settings())):
            self.startPolling()

    def onResume(self):
        if self.ensureDependencies() and self.run(self.workflow.resume):
            self.startPolling()

    def onActivateLearned(self):
        outcome = self.workflow.outcome
        question = outcome.scores.activation_question(outcome.version) if outcome.scores else None
        if question and not slicer.util.confirmYesNoDisplay(question, "CIMISLearner"):
            return
        if self.run(lambda: self.workflow.activate_learned(self.settings())):
            self.setMessage(self.workflow.outcome.message)
            if self.workflow.busy:
                self.startPolling()
        self.refreshVersions()

    def onCancel(self):
        self.workflow.cancel()

    def startPolling(self):
        self.lastMessage, self.lastFailed = "", False
        self.ui.progressBar.value = 0
        self.timer.start()
        self.updateGUI()

    def onPoll(self):
        try:
            status = self.workflow.poll()
        except Exception as exc:  # never leave the timer raising every 500 ms
            self.timer.stop()
            self.setMessage(f"CIMISLearner failed while following the job ({type(exc).__name__}: {exc})", True)
            raise
        if status is not None and status.iteration is not None and status.total:
            self.ui.progressBar.maximum = status.total
            self.ui.progressBar.value = status.iteration
        self.showLog()
        if not self.workflow.busy:
            self.timer.stop()
            if status is not None:
                failed = status.state != "done"
                self.setMessage(status.message if failed else self.workflow.outcome.message, failed)
            self.showScores()
            self.refreshVersions()
        self.updateGUI(status)

    def showLog(self):
        for line in self.workflow.log[self.shownLogLines:]:
            self.ui.logText.appendPlainText(line)
            if line.startswith(("warning", "error")):
                self.ui.logCollapsibleButton.collapsed = False
        self.shownLogLines = len(self.workflow.log)

    def showScores(self):
        scores = self.workflow.outcome.scores
        rows = scores.rows() if scores is not None else []
        self.ui.scoresTable.setRowCount(len(rows))
        for row, (organ, measure, value, flagged) in enumerate(rows):
            for column, text in enumerate((organ, measure, value + ("  below threshold" if flagged else ""))):
                item = qt.QTableWidgetItem(text)
                if flagged:
                    item.setForeground(qt.QBrush(qt.QColor("#c0392b")))
                self.ui.scoresTable.setItem(row, column, item)

    def ensureDependencies(self):
        """Before any action that needs the engine: torch through the PyTorch extension (the right CUDA
        build, with a version requirement), then the rest with pip, pinned to that torch; after asking."""
        from cimis_slicer.dependencies import TORCH_REQUIREMENT, missing_requirements

        plan = missing_requirements()
        if plan.nothing_to_do:
            return True
        self.setMessage(plan.status_line(), failed=True)
        if not slicer.util.confirmOkCancelDisplay(plan.question(), "CIMISLearner"):
            return False
        if plan.torch_needed:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.errorDisplay("CIMISLearner needs PyTorch: install the PyTorch extension with the "
                                         "Extensions Manager, restart Slicer, then try again.", "CIMISLearner")
                return False
            with slicer.util.tryWithErrorDisplay("Installing PyTorch failed.", waitCursor=True):
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                 torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    return False
        if plan.requirements:
            with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
                slicer.util.pip_install(plan.pip_arguments())
        plan = missing_requirements()
        self.setMessage("" if plan.nothing_to_do else plan.status_line(), failed=not plan.nothing_to_do)
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
        flow = self.workflow
        task = flow.task
        item = self.ui.versionsList.currentItem()
        view = panel_view(PanelInputs(
            registry_ok=registryOk, registry_message=registryMessage, volume_selected=p.inputVolume is not None,
            segmentation_selected=p.segmentation is not None or bool(self.learnSet),
            new_structure_names=p.newStructureNames, job_running=flow.busy, job_kind=task.kind if task else "",
            job_status=task.process.status.describe() if task else "", last_message=self.lastMessage,
            last_failed=self.lastFailed, version_selected=item is not None and not item.text().startswith("*"),
            any_version_selected=item is not None, registry_empty=flow.registry_is_empty(),
            awaiting_activation=flow.outcome.awaiting_activation, can_resume=flow.can_resume))
        self.ui.registryPathLineEdit.enabled = view.registry_change_enabled
        self.ui.importModelButton.enabled = view.import_enabled
        self.ui.trainFirstButton.visible = flow.registry_is_empty()
        self.ui.trainFirstButton.enabled = view.train_first_enabled
        self.ui.segmentButton.enabled = view.segment_enabled
        self.ui.addStructuresButton.enabled = view.add_structures_enabled
        self.ui.learnButton.enabled = view.learn_enabled
        self.ui.resumeButton.enabled = view.resume_enabled
        self.ui.cancelButton.enabled = view.cancel_enabled
        self.ui.activateButton.enabled = view.activate_enabled
        self.ui.exportVersionButton.enabled = view.export_enabled
        self.ui.deleteVersionButton.enabled = view.delete_enabled
        self.ui.activateLearnedButton.visible = view.activate_learned_enabled
        self.ui.scoresTable.visible = flow.outcome.scores is not None
        self.ui.settingsCollapsibleButton.enabled = view.settings_enabled
        self.ui.progressBar.visible = flow.busy
        self.ui.statusLabel.text = view.status
        self.ui.statusLabel.styleSheet = "color: #c0392b" if view.status_is_error else ""


class CIMISLearnerLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue only: the parameter node, settings and where job folders live; the behaviour is in
    cimis_slicer."""

    def getParameterNode(self):
        return CIMISLearnerParameterNode(super().getParameterNode())

    @staticmethod
    def keepJobFolders():
        return str(qt.QSettings().value(KEEP_JOBS_SETTING, "false")).lower() == "true"

    def createWorkflow(self):
        """The widget's one workflow; the registry is set (and refused while a job runs) on it later. Job
        folders live under Slicer's temporary folder, owner-only; a crashed session's go when the module opens,
        the others when the next job starts or Slicer closes."""
        from cimis_slicer.context import SlicerContext
        from cimis_slicer.workflow import Workflow

        jobs = Path(slicer.app.temporaryPath) / "CIMISLearner" / "jobs"
        return Workflow(SlicerContext.running_slicer(), None, jobs, keep_job_folders=self.keepJobFolders())


class CIMISLearnerTest(ScriptedLoadableModuleTest):
    """The sample CT through Sample Data, then the bridge tests' full round, inside Slicer: ``Slicer
    --no-main-window --python-code "slicer.selfTests['CIMISLearner'](); slicer.util.exit()"``."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from cimis_slicer.dependencies import missing_requirements

        self.setUp()
        self.test_sample_data()
        self.setUp()
        plan = missing_requirements()
        if not plan.nothing_to_do:
            # The extensions' build machines have no torch: say why nothing ran instead of failing.
            self.delayDisplay(f"CIMISLearner self-test skipped: {', '.join(plan.missing_names())} not installed "
                              "(install them from the module, then run the test again)")
            return
        self.test_full_round()

    def test_sample_data(self):
        """The sample CT loads through Slicer's own Sample Data module (needs no torch)."""
        import SampleData

        from cimis_slicer.sample_data import SAMPLE_NAME, sample_problems

        registerSampleData()
        volume, segmentation = SampleData.downloadSamples(SAMPLE_NAME)
        self.assertEqual(sample_problems(volume, segmentation), [])
        self.delayDisplay("Sample CT loaded from Sample Data")

    def test_full_round(self):
        import tempfile

        from cimis.registry import Registry
        from cimis_slicer.context import SlicerContext
        from cimis_slicer.round_trip import BASE_CLASSES, NEW_CLASS, make_base_registry, run_round
        from cimis_slicer.segments import segments_of

        self.delayDisplay("Training a tiny base model, then Segment, paint, Learn, check, Activate, Segment again")
        with tempfile.TemporaryDirectory() as tmp:
            registry = make_base_registry(Path(tmp) / "base")
            result = run_round(SlicerContext.running_slicer(), Path(tmp) / "round", registry,
                               idle=lambda: slicer.app.processEvents() or qt.QThread.msleep(100))
            self.assertEqual(Registry(registry).active_version(), "v0002")
            self.assertEqual({s.name for s in segments_of(result.second)}, set(BASE_CLASSES) | {NEW_CLASS})
            self.assertEqual({s.name for s in segments_of(result.first)}, set(BASE_CLASSES))
        self.delayDisplay("Test passed")
