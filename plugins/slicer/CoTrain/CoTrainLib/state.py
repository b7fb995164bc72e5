"""The co-training panel's state, built from the server's answers, and the texts it shows.

Pure functions and data classes (standard library only; no ``slicer``, ``qt``, ``vtk`` or
``monailabel``), so all of it is tested outside 3D Slicer against a real server.

Sources: MONAI Label's ``/info/`` (``train_stats`` per model: epochs, losses, Dice, counts;
``datastore`` counts) and the co-training app's ``/cotrain/state`` (method, retrain-on-submit
switch, served model file, and the training status). The status is the server's
(``training.status`` and ``error``, worked out in ``apps/cotrain/lib/control.py``); the panel
shows it as is. A server without ``/cotrain`` (a stock MONAI Label app) gets the train stats'
own ``status`` only (``RUNNING``, ``DONE``, ``FAILED``, else ``NOT STARTED``).
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field
from typing import Any

#: Display names of the co-training methods.
METHOD_NAMES = {"dct_seg": "DCT-Seg", "duo_segnet": "Duo-SegNet", "supervised": "supervised"}

#: Entries of ``train_stats.losses`` that are not loss terms.
NOT_LOSSES = frozenset({"learning_rate"})

#: Training states the panel shows (:attr:`TrainingState.status`): those ``/cotrain/state``
#: reports (``training.status``).
NOT_STARTED = "NOT STARTED"
QUEUED = "QUEUED"
STARTING = "STARTING"
RUNNING = "RUNNING"
DONE = "DONE"
FAILED = "FAILED"
STOPPED = "STOPPED"


def _float(value: Any) -> float | None:
    """``value`` as a float, ``None`` if it is missing or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


@dataclass
class TrainingState:
    """The latest training run of one model, as the panel shows it.

    Attributes:
        status: The server's: one of :data:`NOT_STARTED`, :data:`QUEUED`, :data:`STARTING`,
            :data:`RUNNING`, :data:`DONE`, :data:`FAILED`, :data:`STOPPED`.
        epoch: Epochs completed.
        total_epochs: Epochs of the run.
        progress: 0..1 (iterations done).
        losses: Loss terms of the last epoch (``supervised``, ``total``, method terms).
        member_dice: Each member's validation Dice (``None`` before any validation).
        vote_dice: The soft vote's validation Dice.
        disagreement: The members' mean disagreement on the validation images (0: agree).
        best_metric: Best vote Dice of the run.
        learning_rate: The learning rate at the end of the last epoch.
        labeled: Labeled studies the run trained on.
        validation: Labeled studies held out for validation.
        unlabeled: Unlabeled studies the run used.
        warm_start: Whether the run started from the served model.
        processes: Training processes.
        elapsed: Run time so far, or in all once it ended (``H:MM:SS``).
        error: Why the run failed or stopped.
        run_id: The run's id.
    """

    status: str = NOT_STARTED
    epoch: int = 0
    total_epochs: int = 0
    progress: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    member_dice: list[float] | None = None
    vote_dice: float | None = None
    disagreement: float | None = None
    best_metric: float | None = None
    learning_rate: float | None = None
    labeled: int | None = None
    validation: int | None = None
    unlabeled: int | None = None
    warm_start: bool | None = None
    processes: int | None = None
    elapsed: str | None = None
    error: str | None = None
    run_id: str | None = None


@dataclass
class ServedModel:
    """The ensemble file the server answers inference with.

    Attributes:
        file: Its name (``NAME.pt``).
        published: Whether a training published one yet.
        modified_time: When it was published (seconds since the epoch).
        mtime_ns: The same in nanoseconds (changes with every publish).
    """

    file: str | None = None
    published: bool = False
    modified_time: float | None = None
    mtime_ns: int | None = None


@dataclass
class ModelState:
    """One served model.

    Attributes:
        name: Model name (``dct_seg``, ...).
        method: Co-training method.
        members: Ensemble members.
        labels: Label names to values.
        auto_train: Retrain on submit; ``None`` if the server has no ``/cotrain`` endpoints.
        auto_train_source: ``conf`` (``--conf auto_train``) or ``runtime`` (switched here).
        min_labels: Final labels needed before a submit starts training.
        served_model: The served ensemble file (``None`` if unknown).
        training: The latest training run.
    """

    name: str
    method: str | None = None
    members: int | None = None
    labels: dict[str, int] = field(default_factory=dict)
    auto_train: bool | None = None
    auto_train_source: str | None = None
    min_labels: int | None = None
    served_model: ServedModel | None = None
    training: TrainingState = field(default_factory=TrainingState)


@dataclass
class PanelState:
    """Everything the panel shows for the selected model.

    Attributes:
        server_url: The server.
        models: Every model the server trains or serves.
        model: The selected model's state.
        studies_total: Images in the datastore.
        studies_labeled: Images with a final label.
        notice: Something the user should know about the server (e.g. no ``/cotrain``).
    """

    server_url: str
    models: list[str]
    model: ModelState
    studies_total: int = 0
    studies_labeled: int = 0
    notice: str | None = None

    @property
    def studies_unlabeled(self) -> int:
        """Images without a final label."""
        return max(self.studies_total - self.studies_labeled, 0)

    @property
    def control_available(self) -> bool:
        """Whether the server has the co-training app's ``/cotrain`` endpoints."""
        return self.model.auto_train is not None


def model_names(info: dict[str, Any]) -> list[str]:
    """Every model ``/info`` lists as a trainer or an infer model, trainers first."""
    names: list[str] = []
    for section in ("trainers", "models"):
        for name in info.get(section) or {}:
            if name not in names:
                names.append(name)
    return names


def shown_status(
    stats: dict[str, Any] | None, server: dict[str, Any] | None
) -> tuple[str, str | None]:
    """The status to show and why the run failed or stopped.

    Args:
        stats: The model's ``train_stats`` from ``/info/``.
        server: ``/cotrain/state``'s ``training`` of the model (``status``, ``error``);
            ``None`` for a server without ``/cotrain``.

    Returns:
        ``(status, error)``: the server's ``training.status`` and ``error`` as they are;
        without them, the train stats' own ``status`` (``RUNNING``, ``DONE``, ``FAILED``
        with the stats' ``error``), else :data:`NOT_STARTED`.
    """
    server = server if isinstance(server, dict) else {}
    status = server.get("status")
    if isinstance(status, str) and status:
        error = server.get("error")
        return status, str(error) if error else None
    stats = stats if isinstance(stats, dict) else {}
    status = stats.get("status")
    if status in (RUNNING, DONE, FAILED):
        error = stats.get("error") if status == FAILED else None
        return str(status), str(error) if error else None
    return NOT_STARTED, None


def parse_training(
    stats: dict[str, Any] | None, server: dict[str, Any] | None = None
) -> TrainingState:
    """:class:`TrainingState` from ``train_stats`` and ``/cotrain/state``'s ``training``."""
    stats = stats if isinstance(stats, dict) else {}
    status, error = shown_status(stats, server)
    losses = {
        str(k): float(v)
        for k, v in (stats.get("losses") or {}).items()
        if _float(v) is not None and "/" not in str(k) and k not in NOT_LOSSES
    }
    learning_rate = _float((stats.get("losses") or {}).get("learning_rate"))
    member_dice = stats.get("member_dice")
    members = (
        [float(d) for d in member_dice if _float(d) is not None]
        if isinstance(member_dice, list)
        else None
    )
    warm_start = stats.get("warm_start")
    return TrainingState(
        status=status,
        epoch=_int(stats.get("epoch")) or 0,
        total_epochs=_int(stats.get("total_epochs")) or 0,
        progress=min(max(_float(stats.get("progress")) or 0.0, 0.0), 1.0),
        losses=losses,
        member_dice=members or None,
        vote_dice=_float(stats.get("vote_dice")),
        disagreement=_float(stats.get("disagreement")),
        best_metric=_float(stats.get("best_metric")),
        learning_rate=learning_rate,
        labeled=_int(stats.get("labeled")),
        validation=_int(stats.get("validation")),
        unlabeled=_int(stats.get("unlabeled")),
        warm_start=warm_start if isinstance(warm_start, bool) else None,
        processes=_int(stats.get("processes")),
        elapsed=stats.get("total_time") or stats.get("current_time"),
        error=error,
        run_id=stats.get("run_id"),
    )


def parse_served_model(value: Any) -> ServedModel | None:
    """:class:`ServedModel` from ``/cotrain/state``'s ``served_model``."""
    if not isinstance(value, dict):
        return None
    return ServedModel(
        file=value.get("file"),
        published=bool(value.get("published")),
        modified_time=_float(value.get("modified_time")),
        mtime_ns=_int(value.get("mtime_ns")),
    )


def build_model_state(
    model: str, info: dict[str, Any], cotrain_state: dict[str, Any] | None
) -> ModelState:
    """The state of ``model`` from ``/info/`` and ``/cotrain/state`` (``None``: no such endpoint)."""
    control = ((cotrain_state or {}).get("models") or {}).get(model)
    control = control if isinstance(control, dict) else {}
    stats = (info.get("train_stats") or {}).get(model)
    training = parse_training(stats, control.get("training"))
    labels = control.get("labels") or ((info.get("models") or {}).get(model) or {}).get("labels")
    method = control.get("method") or (stats or {}).get("method")
    auto_train = control.get("auto_train")
    return ModelState(
        name=model,
        method=method,
        members=_int(control.get("members")),
        labels=dict(labels) if isinstance(labels, dict) else {},
        auto_train=auto_train if isinstance(auto_train, bool) else None,
        auto_train_source=control.get("auto_train_source"),
        min_labels=_int(control.get("min_labels")),
        served_model=parse_served_model(control.get("served_model")),
        training=training,
    )


def build_panel_state(
    server_url: str,
    model: str,
    info: dict[str, Any],
    cotrain_state: dict[str, Any] | None,
    notice: str | None = None,
) -> PanelState:
    """The panel's state for ``model`` from ``/info/`` and ``/cotrain/state`` (or ``None``)."""
    datastore = info.get("datastore") if isinstance(info.get("datastore"), dict) else {}
    return PanelState(
        server_url=server_url,
        models=model_names(info),
        model=build_model_state(model, info, cotrain_state),
        studies_total=_int(datastore.get("total")) or 0,
        studies_labeled=_int(datastore.get("completed")) or 0,
        notice=notice,
    )


# ---------------------------------------------------------------------------- texts


def method_name(method: str | None) -> str:
    """The display name of a co-training method."""
    if not method:
        return "unknown"
    return METHOD_NAMES.get(method, method)


def format_method(model: ModelState) -> str:
    """E.g. ``DCT-Seg, 2 members (model dct_seg; labels: organ)``."""
    text = method_name(model.method)
    if model.members:
        text += f", {model.members} members"
    details = [f"model {model.name}"]
    if model.labels:
        ordered = sorted(model.labels.items(), key=lambda item: item[1])
        details.append("labels: " + ", ".join(name for name, _ in ordered))
    return f"{text} ({'; '.join(details)})"


def format_studies(state: PanelState) -> str:
    """Labeled and unlabeled studies, and what the latest run used."""
    text = (
        f"{state.studies_labeled} labeled, {state.studies_unlabeled} unlabeled "
        f"({state.studies_total} studies)"
    )
    t = state.model.training
    if t.labeled is not None and t.status != NOT_STARTED:
        used = f"{t.labeled} labeled"
        if t.validation:
            used += f" + {t.validation} for validation"
        if t.unlabeled is not None:
            used += f", {t.unlabeled} unlabeled"
        text += f"; latest run: {used}"
    return text


def format_training(training: TrainingState) -> str:
    """One line: the run's status with epoch, progress, time or error."""
    t = training
    epochs = f"epoch {t.epoch}/{t.total_epochs}" if t.total_epochs else f"epoch {t.epoch}"
    if t.status == NOT_STARTED:
        return "not trained yet: no training has run"
    if t.status == QUEUED:
        return "queued: starts when the running training ends"
    if t.status == STARTING:
        return "starting: reading the studies"
    if t.status == RUNNING:
        text = f"running: {epochs} ({round(100 * t.progress)}%)"
        return f"{text}, {t.elapsed}" if t.elapsed else text
    if t.status == DONE:
        text = f"done: {epochs}"
        if t.elapsed:
            text += f" in {t.elapsed}"
        if t.warm_start:
            text += ", warm start from the served model"
        return text
    if t.status == STOPPED:
        return f"stopped by a user at {epochs}; the served model is unchanged"
    if t.status == FAILED:
        return f"failed at {epochs}: {t.error or 'see the server log'}"
    return t.status.lower()


def _loss_order(name: str) -> tuple[int, str]:
    return (2 if name == "total" else 0 if name == "supervised" else 1, name)


def format_losses(training: TrainingState) -> str:
    """The loss terms of the last epoch, e.g. ``supervised 0.4123, cps 0.0312, total 0.4435``."""
    if not training.losses:
        return "none yet"
    names = sorted(training.losses, key=_loss_order)
    text = ", ".join(f"{name} {training.losses[name]:.4f}" for name in names)
    if training.learning_rate is not None:
        text += f" (learning rate {training.learning_rate:.2g})"
    return text


def format_dice(training: TrainingState) -> str:
    """Per-member Dice, the vote's Dice and the members' disagreement."""
    t = training
    if not t.member_dice and t.vote_dice is None:
        if t.status == NOT_STARTED:
            return "none yet"
        return "not validated (too few labels for a validation split)"
    parts = []
    if t.member_dice:
        parts.append("members " + " / ".join(f"{d:.3f}" for d in t.member_dice))
    if t.vote_dice is not None:
        parts.append(f"vote {t.vote_dice:.3f}")
    if t.disagreement is not None:
        parts.append(f"disagreement {t.disagreement:.4f}")
    return ", ".join(parts)


def format_age(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h``, ``2 days``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} days"


def format_served_model(served: ServedModel | None, now: float | None = None) -> str:
    """The served model file and when it was published (local time)."""
    if served is None:
        return "unknown (the server has no /cotrain endpoints)"
    if not served.published or served.modified_time is None:
        return "none: not trained yet"
    when = datetime.datetime.fromtimestamp(served.modified_time).strftime("%Y-%m-%d %H:%M:%S")
    age = format_age((time.time() if now is None else now) - served.modified_time)
    return f"{served.file}, published {when} ({age} ago)"


def format_auto_train(model: ModelState) -> str:
    """Whether a submitted label starts training, and from where the setting comes."""
    if model.auto_train is None:
        return "unknown (the server has no /cotrain endpoints)"
    if model.auto_train:
        text = "on: saving a final label starts training"
        if model.min_labels:
            text += f" once {model.min_labels} labels exist"
    else:
        text = "off: saved labels are stored, training starts only from here"
    if model.auto_train_source == "runtime":
        text += " (switched at runtime)"
    return text


def panel_texts(state: PanelState, now: float | None = None) -> dict[str, str]:
    """Every text of the panel's state section, by row name."""
    model = state.model
    return {
        "method": format_method(model),
        "studies": format_studies(state),
        "training": format_training(model.training),
        "losses": format_losses(model.training),
        "dice": format_dice(model.training),
        "served_model": format_served_model(model.served_model, now),
        "auto_train": format_auto_train(model),
    }


def progress_percent(training: TrainingState) -> int:
    """0..100 for a progress bar (100 once a run is done)."""
    if training.status == DONE:
        return 100
    return round(100 * training.progress)


def describe_save_outcome(answer: dict[str, Any], model: str) -> str:
    """What saving a label did for ``model``, from the save-label answer."""
    outcome = (answer.get("train") or {}).get(model) if isinstance(answer, dict) else None
    labeled = answer.get("labeled") if isinstance(answer, dict) else None
    prefix = f"Label saved ({labeled} labeled)" if labeled is not None else "Label saved"
    if not outcome:
        return f"{prefix}; no training requested"
    messages = {
        "started": "training started",
        "queued": "training queued after the running one",
        "coalesced": "the waiting training will include it",
    }
    if outcome == "auto_train is off":
        return f"{prefix}; retrain on submit is off: no training started"
    return f"{prefix}; {messages.get(outcome, outcome)}"


#: File name endings MONAI Label's datastore drops from image ids.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


def image_id_from_volume_name(name: str | None) -> str | None:
    """The datastore id a volume named ``name`` most likely has (file endings dropped)."""
    if not name or not name.strip():
        return None
    name = name.strip()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or None
    return name


def choose_image_id(
    typed: str | None, monailabel_sample_id: str | None, volume_name: str | None
) -> str | None:
    """The study to show the uncertainty of: typed in the panel, else MONAI Label's current
    sample, else the volume shown in the views (MONAI Label names it after the image)."""
    for candidate in (typed, monailabel_sample_id):
        if candidate and candidate.strip():
            return candidate.strip()
    return image_id_from_volume_name(volume_name)


def candidate_volume_names(image_id: str, monailabel_sample: dict[str, Any] | None) -> list[str]:
    """Names the volume of ``image_id`` may have in Slicer, most likely first.

    MONAI Label's module records the name of the volume it loaded for its current sample
    (``VolumeNodeName``); otherwise the volume is named after the image id or file.
    """
    names: list[str] = []
    sample = monailabel_sample if isinstance(monailabel_sample, dict) else {}
    if sample.get("id") == image_id and sample.get("VolumeNodeName"):
        names.append(str(sample["VolumeNodeName"]))
    names.append(image_id)
    names.extend(f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES)
    return list(dict.fromkeys(names))


def safe_file_name(text: str) -> str:
    """``text`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "image"
