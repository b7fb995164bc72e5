"""The app's settings: ``--conf`` strings (and train-request options) parsed into library
settings, with one parser per kind of value.

``monailabel start_server ... --conf KEY VALUE`` hands the app strings. Any
:class:`cotrain.config.TrainConfig` setting may be given (``labels``, ``members``, ``roi_size``,
``target_spacing``, ``intensity``, ``epochs``, ``iterations_per_epoch``, ``batch_size``,
``learning_rate``, ``network``, ``method_params``, ...; a former name such as ``views`` for
``members`` still works), plus the app's own settings ``auto_train``, ``min_labels``,
``val_split``, ``val_min_labels``, ``processes``, ``retrain_minutes``, ``first_train_minutes``,
``score_minutes`` and the test hook ``test_fault_injection``
(see :mod:`lib.trainers.fault_injection`; never on a real server). A key prefixed with a model
name (``dct_seg.epochs``) applies to that model only and wins over the plain key.

``roi_size``, ``target_spacing`` and ``intensity``, when neither ``--conf`` nor the model's
defaults set them, are planned from the studies at start-up (:mod:`cotrain.planning`, wired in
:class:`lib.configs.base.CoTrainTaskConfig`; :func:`unset_planned_settings` says which).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cotrain.config import RENAMED_SETTINGS, TrainConfig
from cotrain.methods import METHOD_CLASSES
from cotrain.planning import PLANNED_SETTINGS

logger = logging.getLogger(__name__)

#: Labels when ``--conf labels`` is not given.
DEFAULT_LABELS: dict[str, int] = {"organ": 1}


def parse_bool(value: str | bool) -> bool:
    """Parse ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case): the one reader of
    yes/no values in ``--conf``, train requests and infer requests.

    Raises:
        ValueError: For anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1", "y", "t"):
        return True
    if text in ("false", "no", "off", "0", "n", "f"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_json_or_list(value: str) -> Any:
    """JSON if it parses, else a comma separated list of the stripped parts."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return [part.strip() for part in value.strip("[]()").split(",") if part.strip()]


def parse_labels(value: str) -> dict[str, int]:
    """Parse labels: a JSON object ``{"name": value}``, or names (JSON list or ``a,b``) that get
    the values 1, 2, ... in order."""
    parsed = _parse_json_or_list(value)
    if isinstance(parsed, str):
        parsed = [parsed]
    if isinstance(parsed, dict):
        return {str(k): int(v) for k, v in parsed.items()}
    if isinstance(parsed, list):
        return {str(name): i for i, name in enumerate(parsed, start=1)}
    raise ValueError(
        f"labels must be a JSON object name -> value or a list of names, got {value!r}"
    )


def parse_size(value: str) -> tuple[int, ...]:
    """Parse a size: ``[96,96,64]``, ``96,96,64`` or one number for every axis of a 3D ROI."""
    parsed = _parse_json_or_list(value)
    if isinstance(parsed, int | float):
        return (int(parsed),) * 3
    return tuple(int(float(v)) for v in parsed)


def parse_spacing(value: str) -> tuple[float, ...] | None:
    """Parse a voxel spacing like :func:`parse_size`; ``none``, ``null`` or empty keep the grid."""
    if value.strip().lower() in ("", "none", "null", "original"):
        return None
    parsed = _parse_json_or_list(value)
    if parsed is None:
        return None
    if isinstance(parsed, int | float):
        return (float(parsed),) * 3
    return tuple(float(v) for v in parsed)


def _parse_json(value: str) -> Any:
    return json.loads(value)


#: How each TrainConfig setting is read from its ``--conf`` string.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "labels": parse_labels,
    "roi_size": parse_size,
    "target_spacing": parse_spacing,
    "network": _parse_json,
    "method_params": _parse_json,
    "amp": parse_bool,
}
#: TrainConfig settings a server does not take from ``--conf`` (each task config sets it).
_NOT_FROM_CONF = {"method"}


def _parser_for(field: dataclasses.Field) -> Callable[[str], Any]:
    """The parser of a TrainConfig field: by name, else by the type of its default."""
    if field.name in _PARSERS:
        return _PARSERS[field.name]
    default = field.default
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, str):
        return str
    return _parse_json


#: Default time budgets in minutes, (retrain, first training), by training device: what a
#: radiologist can wait for between two submits on a CPU server, longer on a GPU server, where
#: the same minutes buy many more iterations. ``--conf retrain_minutes`` / ``first_train_minutes``
#: change them; a run also stops at its configured epochs.
DEFAULT_BUDGET_MINUTES: dict[str, tuple[float, float]] = {"cpu": (8.0, 15.0), "cuda": (15.0, 30.0)}

#: Default wall-time bound of one scoring run (minutes), as a fraction of the device's default
#: retrain budget: scoring after a publish shares the machine with the next retrain, so it gets
#: a quarter of the cycle (2 minutes on CPU, where a 512x512x160 CT takes about 25 s with 2
#: members on one core, ``bench/results/speed-cpu.md``; 3.75 on a GPU). What it leaves is
#: scored by the next run.
DEFAULT_SCORE_FRACTION = 0.25

#: Default supervised warm-up (``TrainConfig.supervised_warmup_iterations``) by training device,
#: for the methods with unlabeled terms, when neither ``--conf`` nor the model's defaults set it.
#: A CPU server's budgets buy a few hundred iterations over a model's first trainings, where the
#: unlabeled terms' ramps are still near 0 while a co-training step costs 4-5 supervised ones:
#: training the supervised term alone there gave the served DCT-Seg 67.6 Dice after its first
#: 3-minute training instead of 24.1 (``bench/results/session-r1.5-warmup.md`` against
#: ``session-r1.5-1thread.md``). A GPU server's budgets buy thousands of iterations, where the
#: tuning split favoured none (83.15 without against 82.73 with 300 at 1000 iterations,
#: ``bench/results/quick-tune-1000it.md``).
DEFAULT_WARMUP_ITERATIONS: dict[str, int] = {"cpu": 300, "cuda": 0}


@dataclass
class ModelSettings:
    """Everything one served model takes from ``--conf``.

    Attributes:
        train_config: The training configuration (method, labels, ROI, epochs, ...).
        auto_train: Start training when a final label is saved.
        min_labels: Final labels needed before an automatic training starts.
        val_split: Fraction of the labeled images held out for validation...
        val_min_labels: ...once at least this many labels exist (else no validation).
        processes: Training processes (0: one per GPU when there are several, else 1; on a
            CPU-only server N > 1 trains with N gloo processes).
        retrain_minutes: Wall-time bound of a retrain that warm-starts from the served model
            (``None``: :data:`DEFAULT_BUDGET_MINUTES` of the training device; 0: no bound).
        first_train_minutes: The same for a training with no served model to start from.
        score_minutes: Wall-time bound of one scoring run (``None``: a quarter of the default
            retrain budget of the scoring device; 0: no bound).
        warmup_from_device: Whether ``train_config.supervised_warmup_iterations`` was left
            unset, so that each run takes :data:`DEFAULT_WARMUP_ITERATIONS` of its device.
        test_fault_injection: TEST HOOK: train requests may ask for a failure
            (:mod:`lib.trainers.fault_injection`).
    """

    train_config: TrainConfig
    auto_train: bool = True
    min_labels: int = 2
    val_split: float = 0.2
    val_min_labels: int = 5
    processes: int = 0
    retrain_minutes: float | None = None
    first_train_minutes: float | None = None
    score_minutes: float | None = None
    warmup_from_device: bool = False
    test_fault_injection: bool = False

    def budget_minutes(self, device_type: str, warm_start: bool) -> float:
        """A run's time budget (minutes; 0: none): the setting, else the device's default.

        Args:
            device_type: ``"cuda"`` or ``"cpu"``.
            warm_start: Whether the run starts from the served model (a retrain).
        """
        setting = self.retrain_minutes if warm_start else self.first_train_minutes
        if setting is not None:
            return setting
        retrain, first = DEFAULT_BUDGET_MINUTES["cuda" if device_type == "cuda" else "cpu"]
        return retrain if warm_start else first

    def device_settings(self, device_type: str) -> dict[str, Any]:
        """The TrainConfig settings whose default depends on the training device, for a run
        on ``device_type`` (``"cuda"`` or ``"cpu"``): the supervised warm-up when it was left
        unset and the method has unlabeled terms (else nothing)."""
        method = METHOD_CLASSES[self.train_config.method]
        if not (self.warmup_from_device and method.uses_unlabeled):
            return {}
        device = "cuda" if device_type == "cuda" else "cpu"
        return {"supervised_warmup_iterations": DEFAULT_WARMUP_ITERATIONS[device]}

    def scoring_minutes(self, device_type: str) -> float:
        """One scoring run's time budget (minutes; 0: none): the setting, else
        :data:`DEFAULT_SCORE_FRACTION` of the device's default retrain budget.

        Args:
            device_type: ``"cuda"`` or ``"cpu"``.
        """
        if self.score_minutes is not None:
            return self.score_minutes
        retrain, _ = DEFAULT_BUDGET_MINUTES["cuda" if device_type == "cuda" else "cpu"]
        return DEFAULT_SCORE_FRACTION * retrain


def conf_value(conf: Mapping[str, str], name: str, key: str) -> str | None:
    """The value of ``key`` for model ``name``: ``name.key`` first, then ``key``, then the
    same with a former name of the setting (``views`` for ``members``)."""
    former = [old for old, new in RENAMED_SETTINGS.items() if new == key]
    for k in (f"{name}.{key}", key, *(f"{name}.{old}" for old in former), *former):
        if k in conf and conf[k] is not None:
            return str(conf[k])
    return None


def _applies(setting: str, method: str) -> bool:
    """Whether a method takes a setting (only the unlabeled perturbation and the method's
    hyperparameters are method-specific)."""
    method_class = METHOD_CLASSES[method]
    if setting in ("perturb_unlabeled", "unlabeled_cutout"):
        return method_class.perturbable
    if setting == "method_params":
        return bool(dataclasses.fields(method_class.Params))
    return True


def unset_planned_settings(
    conf: Mapping[str, str], name: str, defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """The planned settings (``roi_size``, ``target_spacing``, ``intensity``) that neither
    ``conf`` (for model ``name``) nor the model's ``defaults`` set: those a plan fills in."""
    return [
        key
        for key in PLANNED_SETTINGS
        if key not in (defaults or {}) and conf_value(conf, name, key) is None
    ]


def parse_model_settings(
    conf: Mapping[str, str],
    name: str,
    method: str,
    defaults: Mapping[str, Any] | None = None,
) -> ModelSettings:
    """Read one model's settings from the server's ``--conf`` strings.

    Args:
        conf: The ``--conf`` key/value strings.
        name: The model's name (for ``name.key`` overrides).
        method: The co-training method of this model.
        defaults: TrainConfig values of this model used when ``conf`` does not set them;
            a ``method_params`` in ``conf`` changes only the hyperparameters it names.

    Returns:
        The model's settings.

    Raises:
        ValueError: Naming the setting whose value is wrong.
    """
    # A deep copy: the settings of one server never share (and so never change) the class
    # defaults or the library constants they come from.
    values: dict[str, Any] = {"labels": dict(DEFAULT_LABELS), **copy.deepcopy(dict(defaults or {}))}
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_FROM_CONF:
            continue
        raw = conf_value(conf, name, field.name)
        if raw is None:
            continue
        if f"{name}.{field.name}" not in conf and not _applies(field.name, method):
            # A server-wide setting of the co-training models (e.g. ``perturb_unlabeled``)
            # is not an error for a model whose method has no use for it (the baseline).
            logger.info("%s: --conf %s does not apply to %s; ignored", name, field.name, method)
            continue
        try:
            value = _parser_for(field)(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--conf {field.name} {raw!r}: {e}") from e
        if field.name == "method_params" and isinstance(value, dict):
            # Set hyperparameters change those only; the model's other defaults stay.
            value = {**values.get("method_params", {}), **value}
        values[field.name] = value
    values["method"] = method
    train_config = TrainConfig.from_dict(values)
    # Checked here, at server start, rather than when the first training starts. (Not in
    # TrainConfig: a served model whose settings name a since-removed hyperparameter must load.)
    try:
        METHOD_CLASSES[method].parse_params(train_config.method_params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--conf method_params {train_config.method_params}: {e}") from e

    app: dict[str, Any] = {}
    for key, parse in (
        ("auto_train", parse_bool),
        ("min_labels", int),
        ("val_split", float),
        ("val_min_labels", int),
        ("processes", int),
        ("retrain_minutes", float),
        ("first_train_minutes", float),
        ("score_minutes", float),
        ("test_fault_injection", parse_bool),
    ):
        raw = conf_value(conf, name, key)
        if raw is not None:
            try:
                app[key] = parse(raw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"--conf {key} {raw!r}: {e}") from e
    settings = ModelSettings(
        train_config=train_config,
        warmup_from_device="supervised_warmup_iterations" not in values,
        **app,
    )
    if settings.min_labels < 1:
        raise ValueError(f"--conf min_labels must be >= 1, got {settings.min_labels}")
    if settings.processes < 0:
        raise ValueError(f"--conf processes must be >= 0, got {settings.processes}")
    for key in ("retrain_minutes", "first_train_minutes", "score_minutes"):
        if (getattr(settings, key) or 0) < 0:
            raise ValueError(
                f"--conf {key} must be >= 0 (0: no bound), got {getattr(settings, key)}"
            )
    if not 0.0 <= settings.val_split < 1.0:
        raise ValueError(f"--conf val_split must be in [0, 1), got {settings.val_split}")
    return settings
