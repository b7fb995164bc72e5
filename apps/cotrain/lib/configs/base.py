"""The task config every served co-training model extends: one ensemble, its trainer, infer
task, scoring and strategy (MONAI Label's ``TaskConfig``). Its settings come from ``--conf``
(:func:`lib.settings.parse_model_settings`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import Disagreement
from lib.infers import EnsembleInfer
from lib.scoring import EnsembleDisagreement
from lib.settings import parse_model_settings
from lib.trainers import CoTrainTask

logger = logging.getLogger(__name__)


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

    def init(
        self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any
    ) -> None:
        """Read the model's settings from ``conf`` (see :func:`parse_model_settings`)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = parse_model_settings(conf, name, self.method, self.defaults)
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
        )

    def strategy(self) -> Strategy | dict[str, Strategy] | None:
        """Next sample: the unlabeled image the members disagree on most."""
        return {"disagreement": Disagreement()}

    def scoring_method(self) -> ScoringMethod | dict[str, ScoringMethod] | None:
        """Store the members' mean disagreement on each unlabeled image."""
        return {f"disagreement_{self.name}": EnsembleDisagreement(self.name, self.path)}
