"""Slicer-free logic of the CoTrain 3D Slicer module: server client, panel state and texts.

Standard library only, so it runs inside 3D Slicer's Python as is and is tested outside it.
"""

from __future__ import annotations

from .client import (
    AuthenticationError,
    CoTrainClient,
    CoTrainError,
    EndpointMissingError,
    NotTrainedError,
    ServerUnreachableError,
    TrainingBusyError,
    UnknownModelError,
)
from .controller import CoTrainController, UncertaintyMap
from .state import ModelState, PanelState, ServedModel, TrainingState, panel_texts

__all__ = [
    "AuthenticationError",
    "CoTrainClient",
    "CoTrainController",
    "CoTrainError",
    "EndpointMissingError",
    "ModelState",
    "NotTrainedError",
    "PanelState",
    "ServedModel",
    "ServerUnreachableError",
    "TrainingBusyError",
    "TrainingState",
    "UncertaintyMap",
    "UnknownModelError",
    "panel_texts",
]
