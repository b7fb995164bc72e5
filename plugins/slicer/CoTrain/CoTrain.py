"""3D Slicer module "Co-training": the co-training state and controls of a MONAI Label server.

It works beside MONAI Label's own Slicer module, against the same server (the co-training app
``apps/cotrain``): it shows the method, labeled and unlabeled studies, the training progress
with its loss terms, each member's Dice, the vote's Dice and the members' disagreement, and
when the served model was published; it turns retrain on submit on or off, starts and stops
training; and it shows the ensemble's uncertainty map of the current study as a heat-map
overlay.

This file is only the Qt/Slicer layer. Every server call, state and text is in ``CoTrainLib``
(standard library only; tested outside Slicer against a real server).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import ctk
import qt
import slicer
from CoTrainLib import CoTrainController, CoTrainError, UncertaintyMap
from CoTrainLib.state import (
    NOT_STARTED,
    PanelState,
    build_panel_state,
    candidate_volume_names,
    choose_image_id,
    panel_texts,
    progress_percent,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

logger = logging.getLogger(__name__)

#: Server address when none was used before (MONAI Label's default).
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
#: Milliseconds between two automatic refreshes while the module is shown.
REFRESH_INTERVAL_MS = 3000
#: Color tables for the heat map, first found wins.
HEAT_COLOR_NODE_NAMES = ("PET-Heat", "Inferno", "Red")
#: Disagreement below this fraction of the map's maximum is not drawn.
HIDE_BELOW_FRACTION = 0.05
#: Rows of the state section: row name in ``panel_texts`` -> label.
STATE_ROWS = (
    ("method", "Method:"),
    ("studies", "Studies:"),
    ("training", "Training:"),
    ("losses", "Losses:"),
    ("dice", "Dice:"),
    ("served_model", "Served model:"),
    ("auto_train", "Retrain on submit:"),
)


class CoTrain(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Co-training"
        self.parent.categories = ["Active Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["cotrain"]
        self.parent.helpText = """
Co-training state and controls of a MONAI Label server running the co-training app
(DCT-Seg, Duo-SegNet): training progress with loss terms and per-member Dice, the served
model's time, retrain on submit on/off, start/stop training, and the ensemble's uncertainty
(members' disagreement) of the current study as a heat map. Use it beside the MONAI Label
module, against the same server.
"""
        self.parent.acknowledgementText = """
Works with MONAI Label (https://github.com/Project-MONAI/MONAILabel).
"""


class CoTrainWidget(ScriptedLoadableModuleWidget):
    """The panel: widgets only; every action goes through :class:`CoTrainLogic`."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: CoTrainLogic | None = None
        self.timer: Any = None
        self.state: PanelState | None = None
        self.stateLabels: dict[str, Any] = {}
        self._updating = False

    # ------------------------------------------------------------------ layout

    def setup(self) -> None:
        """Build the panel."""
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = CoTrainLogic()

        server = ctk.ctkCollapsibleButton()
        server.text = "Server"
        self.layout.addWidget(server)
        form = qt.QFormLayout(server)
        self.serverEdit = qt.QLineEdit(self.logic.defaultServerUrl())
        self.serverEdit.toolTip = "The MONAI Label server (the same as in the MONAI Label module)"
        form.addRow("Server:", self.serverEdit)
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.echoMode = qt.QLineEdit.Password
        self.tokenEdit.placeholderText = "only if MONAI Label authentication is on"
        form.addRow("Access token:", self.tokenEdit)
        login = qt.QHBoxLayout()
        self.userEdit = qt.QLineEdit()
        self.userEdit.placeholderText = "user"
        self.passwordEdit = qt.QLineEdit()
        self.passwordEdit.echoMode = qt.QLineEdit.Password
        self.passwordEdit.placeholderText = "password"
        self.loginButton = qt.QPushButton("Log in")
        login.addWidget(self.userEdit)
        login.addWidget(self.passwordEdit)
        login.addWidget(self.loginButton)
        form.addRow("Or log in:", login)
        self.modelBox = qt.QComboBox()
        form.addRow("Model:", self.modelBox)
        buttons = qt.QHBoxLayout()
        self.refreshButton = qt.QPushButton("Connect / refresh")
        self.autoRefreshBox = qt.QCheckBox("Refresh every 3 s")
        self.autoRefreshBox.checked = True
        buttons.addWidget(self.refreshButton)
        buttons.addWidget(self.autoRefreshBox)
        form.addRow(buttons)

        stateSection = ctk.ctkCollapsibleButton()
        stateSection.text = "Co-training state"
        self.layout.addWidget(stateSection)
        stateForm = qt.QFormLayout(stateSection)
        for name, title in STATE_ROWS:
            label = qt.QLabel("-")
            label.wordWrap = True
            label.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
            self.stateLabels[name] = label
            stateForm.addRow(title, label)
            if name == "training":
                self.progressBar = qt.QProgressBar()
                self.progressBar.setRange(0, 100)
                stateForm.addRow("", self.progressBar)
        self.messageLabel = qt.QLabel("")
        self.messageLabel.wordWrap = True
        stateForm.addRow(self.messageLabel)

        control = ctk.ctkCollapsibleButton()
        control.text = "Training"
        self.layout.addWidget(control)
        controlForm = qt.QFormLayout(control)
        self.autoTrainBox = qt.QCheckBox("Retrain when a final label is saved (auto_train)")
        controlForm.addRow(self.autoTrainBox)
        self.epochsBox = qt.QSpinBox()
        self.epochsBox.setRange(0, 100000)
        self.epochsBox.specialValueText = "model default"
        controlForm.addRow("Epochs:", self.epochsBox)
        trainButtons = qt.QHBoxLayout()
        self.startButton = qt.QPushButton("Start training")
        self.stopButton = qt.QPushButton("Stop training")
        trainButtons.addWidget(self.startButton)
        trainButtons.addWidget(self.stopButton)
        controlForm.addRow(trainButtons)

        uncertainty = ctk.ctkCollapsibleButton()
        uncertainty.text = "Uncertainty map"
        self.layout.addWidget(uncertainty)
        uncertaintyForm = qt.QFormLayout(uncertainty)
        self.imageEdit = qt.QLineEdit()
        self.imageEdit.placeholderText = "current MONAI Label sample"
        uncertaintyForm.addRow("Image id:", self.imageEdit)
        self.opacitySlider = ctk.ctkSliderWidget()
        self.opacitySlider.minimum = 0.0
        self.opacitySlider.maximum = 1.0
        self.opacitySlider.singleStep = 0.05
        self.opacitySlider.value = 0.5
        uncertaintyForm.addRow("Opacity:", self.opacitySlider)
        self.uncertaintyButton = qt.QPushButton("Show where the members disagree")
        uncertaintyForm.addRow(self.uncertaintyButton)
        self.uncertaintyLabel = qt.QLabel("")
        self.uncertaintyLabel.wordWrap = True
        uncertaintyForm.addRow(self.uncertaintyLabel)

        self.layout.addStretch(1)

        self.refreshButton.connect("clicked(bool)", self.onRefresh)
        self.loginButton.connect("clicked(bool)", self.onLogin)
        self.modelBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.autoRefreshBox.connect("toggled(bool)", self.onAutoRefreshToggled)
        self.autoTrainBox.connect("toggled(bool)", self.onAutoTrainToggled)
        self.startButton.connect("clicked(bool)", self.onStartTraining)
        self.stopButton.connect("clicked(bool)", self.onStopTraining)
        self.uncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)

        self.timer = qt.QTimer()
        self.timer.setInterval(REFRESH_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.updateControls()

    def enter(self) -> None:
        """Module shown: refresh now (errors only in the panel) and keep refreshing."""
        self.refresh(popup=False)
        if self.autoRefreshBox.checked:
            self.timer.start()

    def exit(self) -> None:
        """Module hidden: stop refreshing."""
        self.timer.stop()

    def cleanup(self) -> None:
        """Module closed."""
        if self.timer:
            self.timer.stop()

    # ------------------------------------------------------------------ helpers

    def controller(self) -> CoTrainController:
        """The controller for the server and token in the panel."""
        assert self.logic is not None
        return self.logic.connect(self.serverEdit.text, self.tokenEdit.text)

    def selectedModel(self) -> str | None:
        return self.modelBox.currentText or None

    def showError(self, error: Exception, action: str, popup: bool = True) -> None:
        """Show a failed action: its message in the panel, a dialog for user actions."""
        if isinstance(error, CoTrainError):
            text, details = str(error), None
        else:
            text, details = f"{action}: unexpected error: {error}", traceback.format_exc()
        self.messageLabel.setStyleSheet("color: #c0392b")
        self.messageLabel.text = text
        logger.warning("%s: %s", action, text)
        if popup:
            slicer.util.errorDisplay(text, detailedText=details)

    def showMessage(self, text: str) -> None:
        self.messageLabel.setStyleSheet("")
        self.messageLabel.text = text

    def showState(self, state: PanelState) -> None:
        """Fill every widget from ``state``."""
        self.state = state
        self._updating = True
        try:
            if [self.modelBox.itemText(i) for i in range(self.modelBox.count)] != state.models:
                self.modelBox.clear()
                for name in state.models:
                    self.modelBox.addItem(name)
                self.modelBox.setCurrentIndex(max(state.models.index(state.model.name), 0))
            for name, text in panel_texts(state).items():
                self.stateLabels[name].text = text
            self.progressBar.value = progress_percent(state.model.training)
            if state.model.auto_train is not None:
                self.autoTrainBox.checked = state.model.auto_train
        finally:
            self._updating = False
        if state.notice:
            self.showMessage(state.notice)
        elif self.messageLabel.styleSheet:
            self.showMessage("")
        self.updateControls()

    def updateControls(self) -> None:
        state = self.state
        connected = state is not None
        running = connected and state.model.training.status in ("RUNNING", "STARTING", "QUEUED")
        self.autoTrainBox.enabled = connected and state.control_available
        self.startButton.enabled = connected and not running
        self.stopButton.enabled = connected and running
        self.uncertaintyButton.enabled = connected

    def refresh(self, popup: bool) -> None:
        try:
            self.showState(self.controller().refresh(self.selectedModel()))
        except Exception as e:
            self.showError(e, "Refreshing", popup=popup)

    # ------------------------------------------------------------------ actions

    def onRefresh(self) -> None:
        assert self.logic is not None
        self.logic.saveServerUrl(self.serverEdit.text)
        self.refresh(popup=True)
        if self.autoRefreshBox.checked:
            self.timer.start()

    def onTimer(self) -> None:
        if self.state is not None:
            self.refresh(popup=False)

    def onAutoRefreshToggled(self, checked: bool) -> None:
        if checked:
            self.timer.start()
        else:
            self.timer.stop()

    def onModelChanged(self, index: int) -> None:
        if not self._updating and self.state is not None:
            self.refresh(popup=True)

    def onLogin(self) -> None:
        try:
            controller = self.controller()
            authorization = controller.client.login(self.userEdit.text, self.passwordEdit.text)
            self.tokenEdit.text = authorization
            self.passwordEdit.text = ""
            self.showMessage(f"Logged in as {self.userEdit.text}")
            self.refresh(popup=True)
        except Exception as e:
            self.showError(e, "Logging in")

    def onAutoTrainToggled(self, checked: bool) -> None:
        model = self.selectedModel()
        if self._updating or not model:
            return
        try:
            self.showState(self.controller().set_auto_train(model, checked))
            self.showMessage(f"Retrain on submit is now {'on' if checked else 'off'} for {model}")
        except Exception as e:
            self.showError(e, "Switching retrain on submit")
            self.refresh(popup=False)

    def onStartTraining(self) -> None:
        model = self.selectedModel()
        if not model:
            return
        epochs = self.epochsBox.value or None
        try:
            self.controller().start_training(model, max_epochs=epochs)
            self.showMessage(f"Training of {model} started")
        except Exception as e:
            self.showError(e, "Starting training")
        self.refresh(popup=False)

    def onStopTraining(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
            "Stop the running training? The served model stays as it is."
        ):
            return
        try:
            self.controller().stop_training()
            self.showMessage("Training stopped; the served model is unchanged")
        except Exception as e:
            self.showError(e, "Stopping training")
        self.refresh(popup=False)

    def onShowUncertainty(self) -> None:
        assert self.logic is not None
        model = self.selectedModel()
        image_id = choose_image_id(
            self.imageEdit.text, self.logic.monaiLabelSampleId(), self.logic.shownVolumeName()
        )
        if not model:
            return
        try:
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                umap = self.controller().fetch_uncertainty_map(
                    model, image_id or "", self.logic.tempFolder()
                )
                self.logic.showUncertainty(umap, self.opacitySlider.value)
            finally:
                qt.QApplication.restoreOverrideCursor()
            self.uncertaintyLabel.text = self.logic.describeUncertainty(umap)
        except Exception as e:
            self.showError(e, "Showing the uncertainty map")

    def onOpacityChanged(self, value: float) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)


class CoTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer side of the panel: settings, the MONAI Label module's sample, volume display.

    Server calls and texts are :class:`CoTrainLib.CoTrainController`'s.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._folder: str | None = None
        self._controller: CoTrainController | None = None
        self._controllerKey: tuple[str, str] | None = None

    def connect(self, serverUrl: str, token: str | None) -> CoTrainController:
        """The controller for ``serverUrl`` and ``token`` (reused while they stay the same)."""
        key = (serverUrl.strip(), (token or "").strip())
        if self._controller is None or key != self._controllerKey:
            self._controller = CoTrainController.connect(key[0], key[1] or None)
            self._controllerKey = key
        return self._controller

    def defaultServerUrl(self) -> str:
        """The last server used here, else MONAI Label's module's, else the default."""
        for key in ("CoTrain/serverUrl", "MONAILabel/serverUrl"):
            value = slicer.util.settingsValue(key, "")
            if value:
                return str(value)
        return DEFAULT_SERVER_URL

    def saveServerUrl(self, serverUrl: str) -> None:
        qt.QSettings().setValue("CoTrain/serverUrl", serverUrl.strip())

    def tempFolder(self) -> str:
        """Folder for downloaded maps (one per Slicer session)."""
        if self._folder is None:
            self._folder = slicer.util.tempDirectory("CoTrain")
        return self._folder

    def monaiLabelSample(self) -> dict[str, Any] | None:
        """MONAI Label's module's current sample (``id``, ``VolumeNodeName``), if any."""
        try:
            widget = slicer.modules.monailabel.widgetRepresentation().self()
        except AttributeError:  # MONAI Label's module not installed
            return None
        sample = getattr(widget, "current_sample", None)
        return sample if isinstance(sample, dict) else None

    def monaiLabelSampleId(self) -> str | None:
        sample = self.monaiLabelSample()
        return str(sample["id"]) if sample and sample.get("id") else None

    def shownVolumeName(self) -> str | None:
        """The name of the background volume of the red slice view."""
        layout = slicer.app.layoutManager()
        widget = layout.sliceWidget("Red") if layout else None
        if widget is None:
            return None
        volumeId = widget.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        node = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        return node.GetName() if node else None

    def imageVolume(self, imageId: str) -> Any:
        """The loaded volume of ``imageId``, if any."""
        for name in candidate_volume_names(imageId, self.monaiLabelSample()):
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                return node
        return None

    def heatColorNodeId(self) -> str | None:
        for name in HEAT_COLOR_NODE_NAMES:
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is not None and node.IsA("vtkMRMLColorNode"):
                return node.GetID()
        return None

    def showUncertainty(self, umap: UncertaintyMap, opacity: float) -> Any:
        """Load the map as a volume and show it over its image with a heat color map.

        Returns:
            The map's volume node (a previous map of the same image and model is replaced).
        """
        name = f"{umap.image_id} uncertainty ({umap.model})"
        previous = slicer.mrmlScene.GetFirstNodeByName(name)
        if previous is not None:
            slicer.mrmlScene.RemoveNode(previous)
        node = slicer.util.loadVolume(umap.path, properties={"name": name, "show": False})
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        colorId = self.heatColorNodeId()
        if colorId:
            display.SetAndObserveColorNodeID(colorId)
        top = umap.max if umap.max and umap.max > 0 else 1.0
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, top)
        display.SetApplyThreshold(1)
        display.SetThreshold(HIDE_BELOW_FRACTION * top, top * 10.0)
        image = self.imageVolume(umap.image_id)
        slicer.util.setSliceViewerLayers(
            background=image if image is not None else "keep-current",
            foreground=node,
            foregroundOpacity=opacity,
        )
        return node

    def describeUncertainty(self, umap: UncertaintyMap) -> str:
        parts = [f"{umap.image_id}: members' disagreement of {umap.model}"]
        if umap.mean is not None and umap.max is not None:
            parts.append(f"mean {umap.mean:.4f}, max {umap.max:.4f}")
        if umap.model_file:
            parts.append(f"model {umap.model_file}")
        return "; ".join(parts)


class CoTrainTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test): the panel texts from sample answers, no server."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_texts_from_answers()

    def test_texts_from_answers(self) -> None:
        self.delayDisplay("Panel texts from sample server answers")
        info = {
            "models": {"dct_seg": {"labels": {"organ": 1}}},
            "trainers": {"dct_seg": {}},
            "datastore": {"total": 8, "completed": 3},
            "train_stats": {
                "dct_seg": {
                    "status": "DONE",
                    "epoch": 2,
                    "total_epochs": 2,
                    "progress": 1.0,
                    "losses": {"supervised": 0.5, "total": 0.6},
                    "member_dice": [0.8, 0.7],
                    "vote_dice": 0.82,
                    "disagreement": 0.01,
                    "total_time": "0:00:21",
                }
            },
        }
        control = {"models": {"dct_seg": {"method": "dct_seg", "auto_train": False}}}
        state = build_panel_state("http://127.0.0.1:8000", "dct_seg", info, control)
        texts = panel_texts(state)
        self.assertIn("epoch 2/2", texts["training"])
        self.assertIn("members 0.800 / 0.700", texts["dice"])
        self.assertIn("5 unlabeled", texts["studies"])
        self.assertTrue(texts["auto_train"].startswith("off"))
        empty = build_panel_state("http://127.0.0.1:8000", "dct_seg", {"trainers": {}}, None)
        self.assertEqual(empty.model.training.status, NOT_STARTED)
        self.delayDisplay("Test passed")
