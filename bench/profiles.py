"""What the quality benchmark runs: its profiles, its method specs, each run's recipe and splits.

A *profile* (:class:`Profile`, :data:`PROFILES`) is one benchmark setting: the data, the test
split, the label counts, the seeds and the training recipe. A *method spec* is a method name
from ``cotrain.methods.METHOD_CLASSES`` with optional hyperparameters or ``TrainConfig`` settings
(``"dct_seg:perturb_unlabeled=true,agreement_focus=0.5"``, see :func:`parse_method`), or
``full``: the supervised ensemble with every training case labeled.

Nothing here trains: :mod:`runner` trains the runs, :mod:`report` summarises them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from cotrain.config import SERVED_RECIPE, TUNED_SETTINGS, TrainConfig
from cotrain.data import list_msd_cases
from cotrain.methods import METHOD_CLASSES

logger = logging.getLogger("bench.profiles")

__all__ = [
    "DEFAULT_METHODS",
    "PROFILES",
    "SERVED_DCT_SEG",
    "SERVED_DUO_SEGNET",
    "SHARED_DATA",
    "STRONG_SUPERVISED",
    "TUNED_DCT_SEG",
    "TUNED_DUO_SEGNET",
    "Case",
    "Profile",
    "Splits",
    "check_method_spec",
    "method_spec",
    "parse_method",
    "served_spec",
    "split_cases",
    "train_config",
]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

#: One case of an MSD folder: ``{"name", "image", "label"}`` paths.
Case: TypeAlias = dict[str, str]
#: Test, validation and training cases, as :func:`split_cases` returns them.
Splits: TypeAlias = tuple[list[Case], list[Case], list[Case]]


def method_spec(method: str, settings: dict[str, Any]) -> str:
    """The inverse of :func:`parse_method`: ``TrainConfig`` settings as a method spec.

    ``("dct_seg", {"perturb_unlabeled": True, "method_params": {"agreement_focus": 0.5}})``
    gives ``"dct_seg:perturb_unlabeled=true,agreement_focus=0.5"``.

    Args:
        method: A method name.
        settings: ``TrainConfig`` settings, the method's hyperparameters under
            ``"method_params"``.

    Returns:
        The spec, settings first, then the hyperparameters, each value as JSON.
    """
    flat = {k: v for k, v in settings.items() if k != "method_params"}
    flat.update(settings.get("method_params", {}))
    return f"{method}:" + ",".join(f"{k}={json.dumps(v)}" for k, v in flat.items())


def served_spec(method: str) -> str:
    """The spec of the recipe the app serves a co-training method with: the recipe of every
    served model (``SERVED_RECIPE``), then the method's ``TUNED_SETTINGS``.

    Args:
        method: ``"dct_seg"`` or ``"duo_segnet"``.
    """
    return method_spec(method, {**SERVED_RECIPE, **TUNED_SETTINGS[method]})


# The recipes chosen with --tune in 1000-iteration runs with flips as the only augmentation
# (bench/results/quick-tune-1000it.md), the names of their rows in quick-1000it.md.
TUNED_DCT_SEG = "dct_seg:perturb_unlabeled=true,agreement_focus=0.5"
TUNED_DUO_SEGNET = "duo_segnet:perturb_unlabeled=true,lambda_u=1.5"
# What the app serves, and the baseline it is measured against (the same augmentation).
SERVED_DCT_SEG = served_spec("dct_seg")
SERVED_DUO_SEGNET = served_spec("duo_segnet")
STRONG_SUPERVISED = method_spec("supervised", {"augmentation": SERVED_RECIPE["augmentation"]})
#: Every method; the co-training papers as published, as tuned and as served.
DEFAULT_METHODS = [
    "supervised",
    STRONG_SUPERVISED,
    "dct_seg",
    TUNED_DCT_SEG,
    SERVED_DCT_SEG,
    "duo_segnet",
    TUNED_DUO_SEGNET,
    SERVED_DUO_SEGNET,
    "jsd",
    "mean_teacher",
    "cps",
    "full",
]


@dataclass
class Profile:
    """A benchmark setting: data, splits, label counts and the training recipe.

    Attributes:
        data: An MSD folder (``imagesTr``, ``labelsTr``).
        num_test: Cases of the test split, never trained or tuned on.
        label_counts: Labeled training cases of each run, fewest first.
        labels: Label names to voxel values.
        train: ``TrainConfig`` settings of every run (the recipe).
        seeds: Seeds of each method and label count (they pick the labeled cases and the
            initialisation).
        num_validation: Training cases set aside for validation during training.
        tuning_cases: Training cases held out for ``--tune`` (hyperparameter choice).
        methods: Method specs run by default.
        targets: Label count -> (least soft-vote Dice in %, or None; least gain over the
            supervised vote in Dice points) that DCT-Seg and Duo-SegNet must reach.
    """

    data: Path
    num_test: int
    label_counts: list[int]
    labels: dict[str, int]
    train: dict[str, Any]
    seeds: list[int] = field(default_factory=lambda: [0])
    num_validation: int = 0
    tuning_cases: int = 20
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    targets: dict[int, tuple[float | None, float]] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    # 200 hippocampus MRIs: 150 train / 50 test; 8 and 15 labeled = 5% and 10% of training cases.
    "quick": Profile(
        data=SHARED_DATA / "hippocampus",
        num_test=50,
        label_counts=[8, 15],
        labels={"anterior": 1, "posterior": 2},
        train={
            "roi_size": (40, 56, 40),
            "epochs": 8,
            "iterations_per_epoch": 50,
            "batch_size": 2,
            "unlabeled_batch_size": 2,
            "learning_rate": 1e-3,
            "network": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
            "val_interval": 0,
        },
        targets={8: (None, 1.5)},
    ),
    # 80 left-atrium MRIs: 64 train / 16 test, 8 and 16 labeled as in the literature; patches
    # of the literature's 112x112x80 voxels at 0.625 mm, here 56x56x40 at the shared data's
    # 1.25 mm (the UNet's last level keeps its size, so that 56 need not divide by 16), the
    # served recipe's augmentation, the served methods against supervised and full supervision;
    # the model kept is the best on 6 validation cases inside the training split (never chosen
    # on the test split). GPU. Targets: BCP (CVPR 2023), 89.62 and 91.26 Dice on this 80/20
    # protocol.
    "full": Profile(
        data=SHARED_DATA / "la2018",
        num_test=16,
        label_counts=[8, 16],
        labels={"left_atrium": 1},
        seeds=[0, 1],
        num_validation=6,
        train={
            "augmentation": "strong",
            "roi_size": (56, 56, 40),
            "epochs": 60,
            "iterations_per_epoch": 100,
            "batch_size": 2,
            "unlabeled_batch_size": 2,
            "learning_rate": 1e-3,
            "network": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 1]},
            "val_interval": 5,
        },
        methods=["supervised", SERVED_DCT_SEG, SERVED_DUO_SEGNET, "full"],
        targets={8: (89.62, 1.5), 16: (91.26, 1.5)},
    ),
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a method spec into its name and its settings.

    ``"dct_seg:lambda_cot=2,lambda_div=0.2"`` gives ``("dct_seg", {"lambda_cot": 2, ...})``.

    Args:
        spec: ``NAME`` or ``NAME:KEY=VALUE,...`` with JSON values.

    Returns:
        The method name and its settings (``TrainConfig`` settings and hyperparameters mixed;
        :func:`train_config` sorts them).

    Raises:
        ValueError: If an item is not ``NAME=VALUE`` with a JSON value.
    """
    name, _, params = spec.partition(":")
    parsed: dict[str, Any] = {}
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"method {spec!r}: {item!r} is not NAME=VALUE with a JSON value"
            ) from None
    return name, parsed


def check_method_spec(profile: Profile, spec: str) -> None:
    """Build a run's configuration and hyperparameters without training.

    So a misspelled method, setting or hyperparameter fails before any run and not hours into
    a benchmark.

    Args:
        profile: The benchmark setting whose recipe the spec changes.
        spec: A method spec (:func:`parse_method`).

    Raises:
        ValueError: Naming the spec and what is wrong with it.
    """
    name, params = parse_method(spec)
    try:
        config = train_config(profile, "supervised" if name == "full" else name, params, seed=0)
        METHOD_CLASSES[config.method].parse_params(config.method_params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"method {spec!r}: {error}") from None


def train_config(profile: Profile, method: str, params: dict[str, Any], seed: int) -> TrainConfig:
    """The profile's recipe for one run.

    Args:
        profile: The benchmark setting.
        method: A method name of ``cotrain.methods.METHOD_CLASSES``.
        params: Settings of the spec: those that name ``TrainConfig`` settings override the
            recipe, the others are the method's hyperparameters.
        seed: The run's seed.

    Returns:
        The run's configuration.
    """
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {**profile.train, **{k: v for k, v in params.items() if k in config_fields}}
    method_params = {k: v for k, v in params.items() if k not in config_fields}
    return TrainConfig(
        method=method, labels=profile.labels, seed=seed, method_params=method_params, **settings
    )


def split_cases(profile: Profile, tune: bool = False) -> Splits:
    """Test, validation and training cases: a fixed shuffle (seed 2024) of the sorted cases.

    Args:
        profile: The benchmark setting.
        tune: Replace the test split by ``profile.tuning_cases`` held out of the training cases.

    Returns:
        ``(test, validation, train)``; only labeled cases.
    """
    cases = [c for c in list_msd_cases(profile.data) if "label" in c]
    random.Random(2024).shuffle(cases)
    test = cases[: profile.num_test]
    validation = cases[profile.num_test : profile.num_test + profile.num_validation]
    train = cases[profile.num_test + profile.num_validation :]
    if tune:
        test, train = train[: profile.tuning_cases], train[profile.tuning_cases :]
    logger.debug(
        "%s: %d test, %d validation, %d training cases%s",
        profile.data,
        len(test),
        len(validation),
        len(train),
        " (tuning)" if tune else "",
    )
    return test, validation, train
