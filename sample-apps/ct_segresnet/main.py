"""Sample app: the co-training tasks adapted to abdominal CT with SegResNet members.

Start it the way ``apps/cotrain`` starts::

    monailabel start_server --app sample-apps/ct_segresnet --studies STUDIES

It reuses the co-training app (``apps/cotrain``: its ``lib`` package and :class:`CoTrainApp`,
found through ``COTRAIN_APP_DIR``, by default ``../../apps/cotrain`` from here) and changes one
thing: the model it serves, ``spleen_ct`` (``spleen_ct.py``), an ensemble with a different MONAI
network, a CT intensity window and its own labels. Every ``--conf`` setting of ``apps/cotrain``
still applies (``--conf epochs 100``, ``--conf intensity ct:-100,300``, ...).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import ClassVar

from monailabel.interfaces.app import MONAILabelApp

#: The co-training app this sample builds on.
COTRAIN_APP_DIR = os.path.abspath(
    os.environ.get(
        "COTRAIN_APP_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "apps", "cotrain")
    )
)
if not os.path.isfile(os.path.join(COTRAIN_APP_DIR, "main.py")):
    raise RuntimeError(f"co-training app not found at {COTRAIN_APP_DIR}; set COTRAIN_APP_DIR")
sys.path.insert(0, COTRAIN_APP_DIR)  # its `lib` package
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spleen_ct.py

from spleen_ct import SpleenCT  # noqa: E402


def _load_cotrain_app():
    """The co-training app's ``main`` module, under its own name (this file is ``main`` too)."""
    spec = importlib.util.spec_from_file_location(
        "cotrain_app_main", os.path.join(COTRAIN_APP_DIR, "main.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cotrain_app = _load_cotrain_app()


# MONAI Label picks the class whose direct bases include MONAILabelApp, hence both bases.
class CTSegResNetApp(cotrain_app.CoTrainApp, MONAILabelApp):
    """The co-training app serving :class:`SpleenCT` (``--conf models`` defaults to it)."""

    configs: ClassVar = {"spleen_ct": SpleenCT}
