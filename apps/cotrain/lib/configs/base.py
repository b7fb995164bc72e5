"""The task config every served co-training model extends: one ensemble, its trainer, infer
task, scoring and strategy (MONAI Label's ``TaskConfig``). Its settings come from ``--conf``
(:func:`lib.settings.parse_model_settings`); ``roi_size``, ``target_spacing`` and ``intensity``
that neither ``--conf`` nor the model's defaults set are planned from the studies folder at
start-up (:func:`plan_studies`, :mod:`cotrain.planning`) and shown in ``/info``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from cotrain.config import TrainConfig
from cotrain.files import write_json_atomically
from cotrain.planning import (
    PLANNED_SETTINGS,
    Fingerprint,
    Plan,
    default_plan,
    fingerprint_images,
    list_images,
    network_strides,
    plan_from_fingerprint,
)
from lib.activelearning import Disagreement, ExpectedError
from lib.infers import EnsembleInfer
from lib.scoring import EnsembleDisagreement, last_run, score_key, scoring_status
from lib.settings import (
    conf_value,
    parse_model_settings,
    parse_size,
    parse_spacing,
    unset_planned_settings,
)
from lib.trainers import CoTrainTask
from lib.trainers.stats import STATS_FILE

logger = logging.getLogger(__name__)

#: The studies' fingerprint (``MODEL_DIR/FINGERPRINT_FILE``), shared by the models and by the
#: train and scoring subprocesses: read again only when the studies' images change.
FINGERPRINT_FILE = "studies_fingerprint.json"


def _cached_fingerprint(
    images: Sequence[Path], spatial_dims: int | None, cache: Path
) -> Fingerprint:
    """:func:`cotrain.planning.fingerprint_images`, kept in ``cache`` under a key made of the
    images' names, sizes and modification times (one read for any dimensions: a fingerprint
    of the images' own dimensions is also the one for those dimensions given)."""
    listing = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in images]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    try:
        stored = json.loads(cache.read_text())
        fingerprint = Fingerprint.from_dict(stored["fingerprint"])
        asked = stored["spatial_dims"]
        if stored["key"] == key and spatial_dims in (asked, asked or fingerprint.spatial_dims):
            return fingerprint
    except (OSError, ValueError, TypeError, KeyError):
        pass
    fingerprint = fingerprint_images(images, spatial_dims)
    try:
        kept = {"key": key, "spatial_dims": spatial_dims, "fingerprint": fingerprint.to_dict()}
        write_json_atomically(kept, cache)
    except OSError as e:
        logger.warning("cannot keep the studies' fingerprint in %s: %s", cache, e)
    return fingerprint


def plan_studies(
    studies: str | None,
    model_dir: str,
    strides: Sequence[int | Sequence[int]],
    spatial_dims: int | None = None,
) -> Plan:
    """Plan the preprocessing from the NIfTI images of a local studies folder.

    Args:
        studies: The studies folder (a URL or nothing: the defaults, saying why).
        model_dir: Where the fingerprint is kept (:data:`FINGERPRINT_FILE`).
        strides: The member network's downsampling strides.
        spatial_dims: The model's spatial dimensions if set, else the images'.

    Returns:
        The plan; TrainConfig's defaults, with the reason, when no image can be read.
    """
    if not studies or not os.path.isdir(studies):
        return default_plan(f"studies {studies!r} is not a local folder: nothing to plan from")
    images = list_images(studies)
    if not images:
        return default_plan(f"no NIfTI images in {studies} at start-up")
    try:
        fingerprint = _cached_fingerprint(images, spatial_dims, Path(model_dir) / FINGERPRINT_FILE)
    except ValueError as e:
        return default_plan(str(e))
    return plan_from_fingerprint(fingerprint, strides)


class CoTrainTaskConfig(TaskConfig):
    """A served co-training model: one ensemble, its trainer, scoring and strategy.

    Subclasses set :attr:`method` (and may set :attr:`defaults` and :attr:`summary`).
    The served ensemble is ``MODEL_DIR/NAME.pt``; runs and train stats live in
    ``MODEL_DIR/NAME/``.
    """

    #: Co-training method (a name of :data:`cotrain.methods.METHOD_CLASSES`).
    method: ClassVar[str] = ""
    #: One line describing the model in ``/info``.
    summary: ClassVar[str] = ""
    #: TrainConfig values of this method used when ``--conf`` does not set them.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Whether ``--conf models all`` serves it.
    in_all: ClassVar[bool] = True

    def init(
        self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any
    ) -> None:
        """Read the model's settings from ``conf`` (see :func:`parse_model_settings`); plan
        those of :data:`cotrain.planning.PLANNED_SETTINGS` it does not set from the folder
        ``kwargs["studies"]`` (:func:`plan_studies`)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        #: The settings filled in by the plan, and the plan (``None``: nothing to plan).
        self.planned: list[str] = unset_planned_settings(conf, name, self.defaults)
        self.plan: Plan | None = None
        planned: dict[str, Any] = {}
        if self.planned:
            self.plan = plan_studies(
                kwargs.get("studies"), model_dir, *self._planning_inputs(conf, name)
            )
            planned = {k: self.plan.settings[k] for k in self.planned}
            logger.info(
                "+++ %s: planned %s: %s",
                name,
                ", ".join(f"{k} {v}" for k, v in planned.items()),
                "; ".join(self.plan.reasons),
            )
        self.settings = parse_model_settings(conf, name, self.method, {**planned, **self.defaults})
        self.labels = dict(self.settings.train_config.labels)
        self.path = os.path.join(model_dir, f"{name}.pt")
        self.work_dir = os.path.join(model_dir, name)
        c = self.settings.train_config
        logger.info(
            "+++ %s: %s with %d members, labels %s, roi %s, %d epochs; auto_train=%s min_labels=%d",
            name,
            c.method,
            c.members,
            self.labels,
            c.roi_size,
            c.epochs,
            self.settings.auto_train,
            self.settings.min_labels,
        )

    def _planning_inputs(
        self, conf: dict[str, str], name: str
    ) -> tuple[list[int | Sequence[int]], int | None]:
        """The network's strides and the model's spatial dimensions (``None`` when neither
        ``roi_size`` nor ``target_spacing`` is set), from ``conf`` or the defaults."""

        def given(key: str, parse: Any) -> Any:
            raw = conf_value(conf, name, key)
            try:
                return parse(raw) if raw is not None else self.defaults.get(key)
            except ValueError:  # parse_model_settings reports it
                return None

        network = given("network", json.loads)
        strides = network_strides(network if isinstance(network, dict) else TrainConfig().network)
        sizes = [given("roi_size", parse_size), given("target_spacing", parse_spacing)]
        return strides, next((len(s) for s in sizes if s), None)

    def plan_info(self) -> dict[str, Any]:
        """``/info`` entry ``plan``: the settings in effect, which of them were planned, why,
        and the plan with the fingerprint it was derived from (``None``: nothing planned)."""
        c = self.settings.train_config
        given = [k for k in PLANNED_SETTINGS if k not in self.planned]
        reasons = list(self.plan.reasons) if self.plan is not None else []
        if given:
            reasons.append(f"{', '.join(given)}: set by --conf or the model's defaults")
        return {
            "roi_size": list(c.roi_size),
            "target_spacing": list(c.target_spacing) if c.target_spacing else None,
            "intensity": c.intensity,
            "planned": list(self.planned),
            "reasons": reasons,
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }

    @property
    def description(self) -> str:
        """``/info`` description of the model."""
        c = self.settings.train_config
        return f"{self.summary} ({c.members} members, soft voting)"

    def infer(self) -> InferTask | dict[str, InferTask]:
        """The ensemble's soft-voting segmentation."""
        return EnsembleInfer(
            path=self.path,
            labels=self.labels,
            dimension=self.settings.train_config.spatial_dims,
            description=self.description,
            stats_path=os.path.join(self.work_dir, STATS_FILE),
        )

    def trainer(self) -> TrainTask | None:
        """Co-training on the final labels plus every unlabeled image."""
        return CoTrainTask(
            name=self.name,
            model_path=self.path,
            work_dir=self.work_dir,
            train_config=self.settings.train_config,
            val_split=self.settings.val_split,
            val_min_labels=self.settings.val_min_labels,
            processes=self.settings.processes,
            description=f"Co-train {self.description}",
            test_fault_injection=self.settings.test_fault_injection,
            budget_minutes=self.settings.budget_minutes,
            device_settings=self.settings.device_settings,
        )

    def strategy(self) -> Strategy | dict[str, Strategy] | None:
        """Next sample: the unlabeled image the members disagree on most (``disagreement``),
        or whose soft vote expects the lowest Dice of its own label (``expected_error``)."""
        return {"disagreement": Disagreement(), "expected_error": ExpectedError()}

    def scoring_method(self) -> ScoringMethod | dict[str, ScoringMethod] | None:
        """Store the members' mean disagreement on each unlabeled image, within the scoring
        budget of the device it runs on (the GPU when there is one)."""
        method = EnsembleDisagreement(
            self.name, self.path, self.scoring_minutes, record_path=self.scoring_record
        )
        return {method.key: method}

    @property
    def scoring_record(self) -> str:
        """Where each scoring run records what it did (``MODEL_DIR/NAME/scoring.json``)."""
        return os.path.join(self.work_dir, "scoring.json")

    @property
    def scoring_minutes(self) -> float:
        """One scoring run's budget on the device scoring runs on (the GPU when there is one)."""
        return self.settings.scoring_minutes("cuda" if torch.cuda.is_available() else "cpu")

    def scoring_status(self, datastore: Datastore) -> dict[str, int]:
        """How many unlabeled images are scored with the served model
        (:func:`lib.scoring.scoring_status`)."""
        return scoring_status(datastore, score_key(self.name), self.path)

    def scoring_info(self, datastore: Datastore) -> dict[str, Any]:
        """``/info`` entry ``scoring``: :meth:`scoring_status`, the budget of one scoring run
        and what the latest run did (``last_run``: counts, ``seconds``, ``model_ts``, ``ts``)."""
        return {
            **self.scoring_status(datastore),
            "budget_minutes": self.scoring_minutes,
            "last_run": last_run(self.scoring_record),
        }
