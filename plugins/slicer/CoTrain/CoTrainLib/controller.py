"""What the co-training panel does, without any Slicer: every button's action and the refresh.

:class:`CoTrainController` is the whole logic behind the 3D Slicer module ``CoTrain`` (whose
Qt layer only shows :func:`CoTrainLib.state.panel_texts` and calls these methods). Standard
library only: no ``slicer``, ``qt``, ``vtk`` or ``monailabel`` import.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .client import CoTrainClient, CoTrainError, EndpointMissingError, UnknownModelError
from .state import PanelState, build_panel_state, describe_save_outcome, model_names, safe_file_name

logger = logging.getLogger(__name__)

#: Datastore label tag of the ensemble's uncertainty maps (``apps/cotrain/main.py``).
UNCERTAINTY_TAG = "uncertainty"


@dataclass
class UncertaintyMap:
    """An uncertainty map saved locally.

    Attributes:
        image_id: The study it belongs to.
        model: The model whose members disagree.
        path: The NIfTI file (same grid as the image: shape and affine).
        mean: Mean disagreement over the image.
        max: Largest disagreement (the heat map's upper end).
        model_file: The model file that answered.
        model_time: When that model file was published (seconds since the epoch).
    """

    image_id: str
    model: str
    path: str
    mean: float | None = None
    max: float | None = None
    model_file: str | None = None
    model_time: float | None = None


class CoTrainController:
    """The panel's actions against one server.

    Args:
        client: The server's client (:class:`CoTrainLib.client.CoTrainClient`).
    """

    def __init__(self, client: CoTrainClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, server_url: str, token: Any = None) -> CoTrainController:
        """A controller for ``server_url`` with an optional access token."""
        return cls(CoTrainClient(server_url, token=token))

    def models(self) -> list[str]:
        """Every model the server trains or serves."""
        return model_names(self.client.info())

    def check_model(self, model: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make sure the server knows ``model``.

        Returns:
            The ``/info/`` answer used.

        Raises:
            UnknownModelError: Naming the models the server has.
        """
        info = info if info is not None else self.client.info()
        names = model_names(info)
        if model not in names:
            served = ", ".join(names) if names else "none"
            raise UnknownModelError(
                f"Unknown model {model!r}: the server at {self.client.server_url} has {served}"
            )
        return info

    def refresh(self, model: str | None = None) -> PanelState:
        """Read the server's state for ``model`` (default: its first model).

        Raises:
            CoTrainError: The server is down, refuses the token, has no models, or does not
                know ``model``.
        """
        info = self.client.info()
        names = model_names(info)
        if model is None:
            if not names:
                raise CoTrainError(f"The server at {self.client.server_url} has no models")
            model = names[0]
        self.check_model(model, info)
        notice = None
        try:
            cotrain_state: dict[str, Any] | None = self.client.cotrain_state()
        except EndpointMissingError as e:
            cotrain_state, notice = None, str(e)
        return build_panel_state(self.client.server_url, model, info, cotrain_state, notice)

    def set_auto_train(self, model: str, enabled: bool) -> PanelState:
        """Turn retrain on submit on or off for ``model``; the state afterwards.

        Raises:
            UnknownModelError: If the server does not know ``model``.
            EndpointMissingError: If the server is not the co-training app.
            AuthenticationError: Without the admin role when authentication is on.
        """
        self.client.set_auto_train(model, enabled)
        return self.refresh(model)

    def start_training(
        self, model: str, max_epochs: int | None = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Start a training run of ``model`` now.

        Args:
            model: The model.
            max_epochs: Epochs of this run (default: the model's ``--conf epochs``).
            params: Other train options (``pretrained``, ``val_split``, ...).

        Returns:
            MONAI Label's train task.

        Raises:
            UnknownModelError: If the server does not know ``model``.
            TrainingBusyError: If a training is running.
        """
        self.check_model(model)
        request = dict(params or {})
        if max_epochs is not None:
            if max_epochs < 1:
                raise CoTrainError(f"Epochs must be at least 1, got {max_epochs}")
            request["max_epochs"] = int(max_epochs)
        task = self.client.start_training(model, request)
        logger.info("training of %s started: %s", model, task.get("id"))
        return task

    def stop_training(self) -> dict[str, Any]:
        """Stop the running training (the served model stays as it was).

        Returns:
            MONAI Label's stopped task.

        Raises:
            CoTrainError: If no training is running.
        """
        task = self.client.stop_training()
        if not task:
            raise CoTrainError("No training is running: nothing to stop")
        logger.info("training stopped: %s", task.get("id"))
        return task

    def submit_label(self, image_id: str, label_path: str, model: str | None = None) -> str:
        """Save a final label (as MONAI Label's own module does) and say what it started.

        Returns:
            E.g. ``Label saved (3 labeled); retrain on submit is off: no training started``.
        """
        answer = self.client.save_label(image_id, label_path)
        if model is None:
            names = list((answer.get("train") or {}).keys())
            model = names[0] if names else ""
        return describe_save_outcome(answer, model)

    def fetch_uncertainty_map(self, model: str, image_id: str, folder: str) -> UncertaintyMap:
        """Compute the members' disagreement on ``image_id`` and download it as NIfTI.

        The server runs the ensemble with ``{"uncertainty": true}``, stores the map in its
        datastore under the label tag ``uncertainty`` and this downloads it into ``folder``.

        Raises:
            UnknownModelError: If the server does not know ``model``.
            NotTrainedError: 503, the model has not been trained yet.
            CoTrainError: Unknown image, or a server that stores no uncertainty map.
        """
        if not image_id:
            raise CoTrainError(
                "No study selected: load one with MONAI Label's module (Next Sample) or type "
                "its image id"
            )
        self.check_model(model)
        params = self.client.infer(model, image_id, {"uncertainty": True})
        uncertainty = params.get("uncertainty")
        if not isinstance(uncertainty, dict) or not uncertainty.get("label"):
            raise CoTrainError(
                f"The server did not store an uncertainty map for {image_id!r}: it stores one "
                "only for images of its datastore and only in the co-training app"
            )
        tag = str(uncertainty.get("tag") or UNCERTAINTY_TAG)
        path = os.path.join(
            folder, f"{safe_file_name(image_id)}_{safe_file_name(model)}_uncertainty.nii.gz"
        )
        self.client.download_label(str(uncertainty["label"]), tag, path)
        served = params.get("model") if isinstance(params.get("model"), dict) else {}
        return UncertaintyMap(
            image_id=image_id,
            model=model,
            path=path,
            mean=_number(uncertainty.get("mean")),
            max=_number(uncertainty.get("max")),
            model_file=served.get("file"),
            model_time=_number(served.get("modified_time")),
        )


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
