"""MONAI Label app serving semi-supervised co-trained ensembles (DCT-Seg, Duo-SegNet).

Start it with::

    monailabel start_server --app apps/cotrain --studies STUDIES --conf models dct_seg

``--conf models`` takes ``dct_seg``, ``duo_segnet``, ``supervised`` (the baseline: k members
trained on the labels alone), a comma separated list, or ``all`` (the co-training models). The
other ``--conf`` settings are described in ``lib/settings.py`` (labels, members,
roi_size, target_spacing, intensity, epochs, auto_train, min_labels, ...).

The app wires MONAI Label to the ``cotrain`` library: each model is an ensemble trained on the
submitted (final) labels plus every unlabeled image, served by soft voting; saving a final
label starts a training run (coalescing submits that arrive meanwhile); the ``disagreement``
strategy proposes the unlabeled image the members disagree on most, ``expected_error`` the one
whose soft vote expects the lowest Dice of its own label.

Bad input gets a clear error and changes nothing: submitted labels and uploaded images are
checked before they are stored (``lib/datastore.py``), ids that would leave the studies folder
are refused, and so are infer requests for files outside it (:meth:`CoTrainApp.check_infer_image`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, ClassVar

import monailabel
import torch
from fastapi import HTTPException
from lib.auth import accept_signed_tokens
from lib.configs import CONFIGS, CoTrainTaskConfig
from lib.control import register_routes, restore_runtime_settings
from lib.datastore import CheckedLocalDatastore
from lib.scheduler import TrainScheduler
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import tasks as background_tasks
from monailabel.utils.others.generic import remove_file

from cotrain.files import is_inside

logger = logging.getLogger(__name__)

#: How this server's own OpenMP threads wait for work, as the process was started (read once,
#: when PyTorch loaded; ``None``: OpenMP's default, spinning).
LAUNCH_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
# Idle OpenMP threads spin on their core by default. The training and scoring subprocesses run
# beside each other and beside auto-segment requests, so on a CPU server each one's spinning
# threads take the cores from the others' work: measured on 2 busy cores, two members' forward
# pass took 1.8 s with spinning threads and 0.12 s with sleeping ones. The subprocesses this
# server starts inherit the setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def scoring_waits() -> bool:
    """Whether a scoring run is queued in this server and has not started yet."""
    return any(task.get("status") == "SUBMITTED" for task in background_tasks("scoring"))


#: Datastore label tag under which requested uncertainty maps are stored.
UNCERTAINTY_TAG = "uncertainty"


def select_models(
    conf: dict[str, str], configs: dict[str, type[CoTrainTaskConfig]] = CONFIGS
) -> list[str]:
    """The model names ``--conf models`` asks for, in ``configs`` order.

    Args:
        conf: The ``--conf`` key/value strings.
        configs: The models an app can serve (an app with one serves it by default).

    Raises:
        ValueError: If ``models`` is missing or names an unknown model.

    ``all`` adds every model whose config has ``in_all`` (the co-training models, not the
    supervised baseline).
    """
    available = ", ".join(["all", *configs])
    value = conf.get("models", "all" if len(configs) == 1 else "")
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError(f"provide --conf models NAME; available: {available}")
    invalid = [n for n in names if n != "all" and n not in configs]
    if invalid:
        raise ValueError(f"unknown model(s) {invalid} in --conf models; available: {available}")
    return [n for n in configs if ("all" in names and configs[n].in_all) or n in names]


class CoTrainApp(MONAILabelApp):
    """Co-training ensembles served through MONAI Label.

    An app that serves other models subclasses it and sets :attr:`configs` (see
    ``sample-apps/``).

    Args:
        app_dir: This app's folder (models go to ``app_dir/model``).
        studies: The studies folder (or datastore URL).
        conf: ``--conf`` key/value strings.
    """

    #: The models this app can serve (``--conf models`` picks among them), by name.
    configs: ClassVar[dict[str, type[CoTrainTaskConfig]]] = CONFIGS

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_dir = os.path.join(app_dir, "model")
        self.models: dict[str, CoTrainTaskConfig] = {}
        for name in select_models(conf, self.configs):
            config = self.configs[name]()
            config.init(name, self.model_dir, conf, None, studies=studies)
            self.models[name] = config
        restore_runtime_settings(self.models)  # auto_train switched at runtime (lib/control.py)
        logger.info("+++ Using models: %s", list(self.models))
        if LAUNCH_WAIT_POLICY is None and not torch.cuda.is_available():
            logger.warning(
                "this server was started without OMP_WAIT_POLICY=PASSIVE: its trainings and "
                "scoring runs wait without spinning, but its own auto-segment requests can be "
                "several times slower while they run; start it with OMP_WAIT_POLICY=PASSIVE"
            )

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - Co-training ({monailabel.__version__})",
            description="Semi-supervised co-trained ensembles (DCT-Seg, Duo-SegNet), soft voting",
            version=monailabel.__version__,
        )
        self.scheduler = TrainScheduler(
            submit=lambda model: self.async_training(model, enqueue=True),
            reading_labels=self._reading_labels,
        )

    def _reading_labels(self, model: str) -> bool:
        """Whether the running training of ``model`` has begun reading the labels: its train
        stats are this run's (``RUNNING``, process alive) and carry ``reading_labels_ts``. A
        subprocess that has not yet written its stats has not read anything."""
        trainer = self._trainers.get(model)
        if trainer is None:
            return True
        stats = trainer.stats()
        return stats.get("status") == "RUNNING" and "reading_labels_ts" in stats

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info``, each model's entry with its ``plan``: the ``roi_size``,
        ``target_spacing`` and ``intensity`` in effect, which were planned from the studies
        and why (:meth:`CoTrainTaskConfig.plan_info`); and its ``scoring``: how many
        unlabeled studies are scored with the served model
        (:meth:`CoTrainTaskConfig.scoring_info`)."""
        meta = super().info()
        datastore = self.datastore()
        for name, entry in meta.get("models", {}).items():
            if name in self.models and isinstance(entry, dict):
                entry["plan"] = self.models[name].plan_info()
                entry["scoring"] = self.models[name].scoring_info(datastore)
        return meta

    def label_values(self) -> dict[str, int]:
        """Every label name and value any served model uses (what a final label may hold)."""
        values: dict[str, int] = {}
        for config in self.models.values():
            values.update(config.labels)
        return values

    def init_datastore(self) -> Datastore:
        """A studies folder: :class:`CheckedLocalDatastore` (validated uploads, atomic writes).

        A DICOMweb URL (a PACS such as Orthanc): MONAI Label's DICOMweb datastore with the
        fixes of :class:`lib.dicomweb.CoTrainDICOMwebDatastore` (final labels stored as DICOM
        SEG in the PACS). XNAT and DSA datastores are MONAI Label's own.
        """
        spatial_dims = {c.settings.train_config.spatial_dims for c in self.models.values()}
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return super().init_datastore()
            from lib.dicomweb import create_dicomweb_datastore

            self.studies = self.studies.rstrip("/").strip()
            return create_dicomweb_datastore(
                self.studies, self.label_values(), spatial_dims=min(spatial_dims)
            )
        return CheckedLocalDatastore(
            self.studies,
            labels=self.label_values(),
            spatial_dims=min(spatial_dims),
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """One soft-voting infer task per model."""
        infers: dict[str, InferTask] = {}
        for name, config in self.models.items():
            task = config.infer()
            infers.update(task if isinstance(task, dict) else {name: task})
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        """One co-training task per model."""
        trainers: dict[str, TrainTask] = {}
        for name, config in self.models.items():
            task = config.trainer()
            if task is not None:
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        """``disagreement`` and ``expected_error`` plus MONAI Label's ``random`` and ``first``."""
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for config in self.models.values():
            strategy = config.strategy()
            if isinstance(strategy, dict):
                strategies.update(strategy)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        """One disagreement scoring method per model."""
        methods: dict[str, ScoringMethod] = {}
        for config in self.models.values():
            method = config.scoring_method()
            if isinstance(method, dict):
                methods.update(method)
        return methods

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        """Start (or coalesce) a training run of every model once enough final labels exist.

        Returns:
            Merged into the save-label response: ``{"train": {model: outcome}, "labeled": n}``
            with outcome ``started``, ``queued``, ``coalesced`` or why nothing was started.
        """
        super().on_save_label(image_id, label_id)
        datastore = self.datastore()
        if not datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL):
            return {}
        labeled = len(datastore.get_labeled_images())
        outcome = self._request_training(labeled, self.models)
        return {"train": outcome, "labeled": labeled}

    def _request_training(
        self, labeled: int, models: dict[str, CoTrainTaskConfig]
    ) -> dict[str, str]:
        """Ask the scheduler to train those of ``models`` that train automatically and have
        enough labels; returns each model's outcome (or why it does not train)."""
        outcome: dict[str, str] = {}
        wanted: list[str] = []
        for name, config in models.items():
            if name not in self._trainers:
                continue
            if not config.settings.auto_train:
                outcome[name] = "auto_train is off"
            elif labeled < config.settings.min_labels:
                outcome[name] = f"waiting for labels ({labeled}/{config.settings.min_labels})"
            else:
                wanted.append(name)
        outcome.update(self.scheduler.request(wanted))
        return outcome

    def on_init_complete(self) -> None:
        """In the server: add the ``/cotrain`` endpoints (``lib/control.py``) and make access
        tokens work (``lib/auth.py``), start up, then start the first training of every model
        that has no served model yet while the studies already hold enough final labels (a
        folder opened with labels in it needs no submit to get its first model)."""
        register_routes()
        accept_signed_tokens()  # MONAI Label 0.8.5 refuses every token under PyJWT 2
        super().on_init_complete()
        untrained = {n: c for n, c in self.models.items() if not os.path.exists(c.path)}
        if untrained:
            labeled = len(self.datastore().get_labeled_images())
            outcome = self._request_training(labeled, untrained)
            logger.info("+++ first training of the models with no served model: %s", outcome)

    def async_scoring(self, method: str | None, params: dict[str, Any] | None = None) -> Any:
        """Run scoring methods in the background.

        In the server this is MONAI Label's own (queued), except that a request for every
        method (MONAI Label's after each next-sample, at start-up and after a training) starts
        no subprocess while every unlabeled study is scored with the served model (each would
        cost the imports of a Python process and find nothing to do), nor queues one while
        another waits to start (that one scores what is pending when it starts; else each
        next-sample of a folder with a backlog would queue one more budget-long run).

        Outside the server, i.e. in a train subprocess right after a model was published,
        MONAI Label would call ``POST /scoring/METHOD``, which the server refuses while any
        scoring runs, and the new model's scores would be lost; ``POST /scoring/`` queues
        every method instead.
        """
        if self._server_mode or not self._scoring_methods:
            if self._server_mode and method is None:
                if scoring_waits():
                    logger.debug("scoring: a run already waits to start; not queueing another")
                    return {}
                if not self._scoring_pending():
                    logger.debug("scoring: every unlabeled study is scored with the served models")
                    return {}
            return super().async_scoring(method, params)
        return self._local_request("/scoring/", params, "Scoring")

    def _scoring_pending(self) -> bool:
        """Whether a published model has an unlabeled study not yet scored with it."""
        datastore = self.datastore()
        for config in self.models.values():
            status = config.scoring_status(datastore)
            if (
                os.path.exists(config.path)
                and status["unlabeled"] > status["scored_with_current_model"]
            ):
                return True
        return False

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Run an infer task; a requested uncertainty map goes into the datastore.

        With ``{"uncertainty": true}`` the map is saved for a datastore image under the label
        tag ``uncertainty`` (download it with ``/datastore/label?label=ID&tag=uncertainty``);
        the result params say where, with the map's mean and maximum.
        """
        store = datastore if datastore else self.datastore()
        image = request.get("image")
        if isinstance(image, str):
            self.check_infer_image(image, store)
        result = super().infer(request, datastore)
        params = result.get("params")
        uncertainty = params.get("uncertainty") if isinstance(params, dict) else None
        if isinstance(uncertainty, dict) and uncertainty.get("file"):
            file = uncertainty.pop("file")
            image_id = request.get("image")
            if isinstance(image_id, str) and store.get_image_uri(image_id):
                info = {"model": request.get("model"), "mean": uncertainty.get("mean")}
                uncertainty["label"] = store.save_label(image_id, file, UNCERTAINTY_TAG, info)
                uncertainty["tag"] = UNCERTAINTY_TAG
            remove_file(file)
        return result

    def check_infer_image(self, image: str, datastore: Datastore) -> None:
        """Refuse an infer request for anything but a datastore image or an uploaded file.

        MONAI Label reads ``image`` as a file path whenever such a file exists, so without
        this check ``?image=/any/file`` or ``../x`` would read files outside the studies
        folder. Allowed: a datastore image id, a file inside the studies folder, a file the
        infer endpoint itself received (it stores uploads directly in the system temporary
        folder) and a session's image.

        Raises:
            HTTPException: 400, naming the id.
        """
        if datastore.get_image_uri(image):
            return
        if os.path.isfile(image):
            folders = [self.studies] if os.path.isdir(self.studies) else []
            if self._sessions is not None:
                folders.append(self._sessions.store_path)
            uploaded = os.path.realpath(os.path.dirname(image)) == os.path.realpath(
                tempfile.gettempdir()
            )
            if uploaded or any(is_inside(image, folder) for folder in folders):
                return
        detail = (
            f"image {image!r} is not an image of this server: give the id of an image in the "
            "studies folder (paths outside it are refused)"
        )
        logger.warning("refused infer request: %s", detail)
        raise HTTPException(status_code=400, detail=detail)
