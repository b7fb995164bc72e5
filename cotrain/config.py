"""Training configuration: every setting of a run as a plain, serialisable dataclass.

The configuration travels inside checkpoints and served models, so that a model file alone
says how to preprocess an image and which labels its channels mean.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from cotrain.methods import METHOD_CLASSES

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS",
    "OPTIMIZERS",
    "SERVED_RECIPE",
    "TUNED_SETTINGS",
    "TrainConfig",
    "parse_intensity",
]

#: Values of ``TrainConfig.augmentation`` and ``TrainConfig.optimizer``.
AUGMENTATIONS = ("flip", "strong")
OPTIMIZERS = ("adamw", "sgd")
#: Former names of settings, still read from model files and settings written with them.
RENAMED_SETTINGS = {"views": "members"}
#: TrainConfig settings that the quality benchmark measured best for the papers' methods
#: (``bench/quality.py --tune``, 8 labeled hippocampus cases): each member sees its own
#: perturbed copy of the unlabeled batch, and the agreement term is focused on foreground
#: (DCT-Seg) or weighted 5x (Duo-SegNet), chosen in 1000-iteration runs with flips; and the
#: copy-paste term (``lambda_mix`` 1, :class:`cotrain.methods.base.CopyPaste`), chosen in runs
#: of up to 4000 iterations with strong augmentation on the tuning split
#: (``bench/README.md``, "Diagnosis runs"): DCT-Seg 1.4-2.0 Dice above the supervised vote
#: from 1000 iterations to 4000 against 0.5-0.7 without it, Duo-SegNet 0.7-1.0 from 1000 to
#: 2500 against 0.05-0.4 without it; measured on the test split in
#: ``bench/results/quick-1000it.md``. DCT-Seg's adversarial diversity term on every 4th step
#: only, weighted 4x (``diversity_every`` 4): on the test split, seeds 0-2, 82.70 ± 0.07 Dice
#: against 82.79 ± 0.14 on every step (within the seed spread) at 3.87x a supervised step
#: instead of 6.93x (``bench/results/speed-cpu-training-memory.md``), so a time-bounded
#: retrain trains about 1.8x as many iterations. And its copy-paste term on every other step,
#: weighted 2x (``mix_every`` 2), because the app's retrains are bounded in time: per
#: iteration it loses a little (test split, 1000 iterations, seeds 0-1: 82.39 ± 0.04 against
#: 82.70 ± 0.07), per minute it wins (2.86x a supervised step instead of 3.99x,
#: ``bench/results/speed-cpu-training.md``; on the tuning split, about 84.2 after the compute
#: of 4000 supervised steps, level with supervised's 84.28 there, against 83.15 for the
#: 1000-iteration run without it, ``bench/results/quick-tune-4000it.md``,
#: ``quick-tune-1000it.md``), and through the server on the CPU defaults it served 85.92 at
#: 16 labels against 85.15 (``bench/results/session-r8-mix2.md``, ``session-r8-1thread.md``,
#: one seed). The app serves them over :data:`SERVED_RECIPE`; the methods' own defaults stay
#: the papers'.
TUNED_SETTINGS: dict[str, dict[str, Any]] = {
    "dct_seg": {
        "perturb_unlabeled": True,
        "method_params": {
            "agreement_focus": 0.5,
            "lambda_mix": 1.0,
            "diversity_every": 4,
            "mix_every": 2,
        },
    },
    "duo_segnet": {
        "perturb_unlabeled": True,
        "method_params": {"lambda_u": 1.5, "lambda_mix": 1.0},
    },
}
#: The training recipe the app serves for every model, the supervised baseline included:
#: nnU-Net's augmentation of the patches (``augmentation="strong"``: rotation, scaling, noise,
#: blur, brightness, contrast, gamma). On the tuning split (8 labeled hippocampus cases,
#: ``bench/results/quick-tune-4000it.md``, one seed) it raised supervised's soft vote from
#: 79.65 to 81.98 Dice at 1000 iterations and from 80.47 to 84.28 at 4000, and DCT-Seg's from
#: 81.49 to 82.72 at 1000, at the same time per step. The library's default stays ``"flip"``.
#: And the co-training terms ramp up over at least 1000 iterations of a model's life
#: (``min_ramp_iterations``; the shortest runs in which the benchmark measured a gain): on a
#: CPU server a retrain trains a few dozen iterations, and DCT-Seg's, ramped within each run,
#: served 25% Dice after its 78-iteration first training (``bench/results/session-r1.5-fill.md``).
SERVED_RECIPE: dict[str, Any] = {"augmentation": "strong", "min_ramp_iterations": 1000}


@dataclass
class TrainConfig:
    """Everything that defines a co-training run.

    Attributes:
        method: A method name of :data:`cotrain.methods.METHOD_CLASSES`.
        members: Number of ensemble members k (each method sets its least k; formerly
            ``views``, a name still accepted by :meth:`from_dict`).
        labels: Foreground label names to their voxel values; background is 0.
        roi_size: Patch size for training and the sliding-window size at inference.
        target_spacing: Voxel size (mm) to resample to, or ``None`` to keep the images' grid.
        intensity: ``"zscore"`` (MR: z-score over non-zero voxels) or ``"ct:LOW,HIGH"``
            (a CT window in HU mapped to [0, 1]).
        epochs: Number of epochs (the most; a ``time_budget_minutes`` may run fewer).
        iterations_per_epoch: Optimiser steps per epoch.
        time_budget_minutes: Bound the run's wall time (0: no bound). After a few steps the
            engine measures its step time and lowers ``epochs`` (and, when one epoch is too
            long, ``iterations_per_epoch``) so that the run, validation included, ends within
            the budget; the schedules then span the planned run (see
            :meth:`cotrain.engine.Trainer.fit_to_budget`).
        min_ramp_iterations: The methods' ramp-ups of their unlabeled terms span at least this
            many iterations of a model's training, counted over the warm-started retrains that
            continue it (0: each run's ramps span that run, and a retrain that continues a
            model starts with them complete; the papers' schedules). With ``N > 0`` a run
            shorter than ``N`` iterations (a retrain on a CPU server, a first training in a
            short budget) leaves them part-way, and the next retrain continues from there, so
            that members trained for a few dozen steps are not yet pushed to agree; runs of at
            least ``N`` iterations are unchanged. See
            :meth:`cotrain.engine.Trainer.ramp_progress`.
        supervised_warmup_iterations: The first ``W`` iterations of a model's training
            (counted, like ``min_ramp_iterations``, over the retrains that continue it) train
            the supervised term alone: no unlabeled batch is drawn and no other term is
            computed, so they cost what a supervised step costs; the ramps are not shifted,
            the terms start at the weight their ramps have reached by then (0: none, the
            papers' schedules; the supervised baseline ignores it). Early in a model's life the
            unlabeled terms' weights are near 0 while a co-training step costs several
            supervised ones, so a short first training on a CPU server gets several times the
            iterations.
        batch_size: Labeled patches per member and step.
        unlabeled_batch_size: Unlabeled patches per step (shared by all members).
        perturb_unlabeled: Give each member its own randomly flipped and intensity-perturbed
            copy of the unlabeled batch; agreement terms compare the predictions flipped back
            onto the shared grid (see :mod:`cotrain.perturbation`). For the methods whose
            members learn from each other (``perturbable`` methods).
        unlabeled_cutout: With ``perturb_unlabeled``, also blank a random box in each member's
            copy, its side this fraction of the patch side (0: no box).
        augmentation: Random augmentation of training patches: ``"flip"`` (random flips along
            every axis) or ``"strong"`` (flips plus nnU-Net-style rotation and scaling,
            Gaussian noise and blur, brightness, contrast and gamma; see
            :func:`cotrain.data.training_transforms`).
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.99, as nnU-Net); either with
            polynomial learning-rate decay.
        learning_rate: Initial learning rate of the members' optimiser.
        weight_decay: The optimiser's weight decay.
        seed: Seed of initialisation, view subsets, sampling and augmentation.
        network: Keyword arguments of the member network (see :func:`cotrain.networks.build_member`).
        method_params: Method hyperparameters (see each method's ``Params``).
        shared_fraction: Fraction of the labeled cases that every member sees; the rest is
            split into exclusive chunks, one per member (DCT-Seg's per-view subsets).
        stack_members: Run the members stacked in one vectorised call instead of one after
            the other (same outputs and gradients; see :class:`cotrain.networks.Ensemble`);
            ``bench/speed.py`` measures which is faster on a device.
        val_interval: Validate every this many epochs (0 disables validation).
        amp: Use mixed precision on CUDA (forward passes only; losses stay fp32).
        deterministic: Bit-reproducible runs on CUDA (deterministic cuDNN kernels). Off by
            default: cuDNN then picks the fastest convolution kernels for the patch size
            (``cudnn.benchmark``). Runs on CPU are reproducible either way.
        num_workers: Data loader worker processes.
        cache_rate: Fraction of the data cached in memory after loading and normalising.
        cache_gb: Memory for the cached volumes (GB; ``None``: a quarter of the machine's
            memory). The labeled volumes are always cached; when the unlabeled studies do not
            all fit in the rest, each run draws a random subset that does (another subset as
            labels are added, so every study is used over time; see
            :class:`cotrain.streams.BatchStreams`).
    """

    method: str = "dct_seg"
    members: int = 2
    labels: dict[str, int] = field(default_factory=lambda: {"foreground": 1})
    roi_size: tuple[int, ...] = (96, 96, 96)
    target_spacing: tuple[float, ...] | None = None
    intensity: str = "zscore"
    epochs: int = 50
    iterations_per_epoch: int = 50
    time_budget_minutes: float = 0.0
    min_ramp_iterations: int = 0
    supervised_warmup_iterations: int = 0
    batch_size: int = 2
    unlabeled_batch_size: int = 2
    perturb_unlabeled: bool = False
    unlabeled_cutout: float = 0.0
    augmentation: str = "flip"
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    network: dict[str, Any] = field(
        default_factory=lambda: {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}
    )
    method_params: dict[str, Any] = field(default_factory=dict)
    shared_fraction: float = 1.0
    stack_members: bool = False
    val_interval: int = 1
    amp: bool = True
    deterministic: bool = False
    num_workers: int = 0
    cache_rate: float = 1.0
    cache_gb: float | None = None

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(s) for s in self.roi_size)
        if self.target_spacing is not None:
            self.target_spacing = tuple(float(s) for s in self.target_spacing)
        self.labels = {str(k): int(v) for k, v in self.labels.items()}
        self.validate()

    @property
    def spatial_dims(self) -> int:
        """2 or 3, from the length of ``roi_size``."""
        return len(self.roi_size)

    @property
    def num_classes(self) -> int:
        """Output channels: background plus one per label value."""
        return 1 + len(self.labels)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is wrong."""
        method = METHOD_CLASSES.get(self.method)
        if method is None:
            raise ValueError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHOD_CLASSES)}"
            )
        if self.members < method.min_members:
            raise ValueError(
                f"method {self.method!r} needs members >= {method.min_members}, got {self.members}"
            )
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"roi_size must have 2 or 3 values, got {self.roi_size}")
        if any(s < 8 for s in self.roi_size):
            raise ValueError(f"every roi_size value must be >= 8, got {self.roi_size}")
        if self.target_spacing is not None and len(self.target_spacing) != self.spatial_dims:
            raise ValueError(
                f"target_spacing {self.target_spacing} must have {self.spatial_dims} values"
            )
        if not self.labels:
            raise ValueError("labels must name at least one foreground label")
        values = sorted(self.labels.values())
        if values != list(range(1, len(values) + 1)):
            raise ValueError(f"label values must be 1..{len(values)} without gaps, got {values}")
        parse_intensity(self.intensity)
        for name in ("epochs", "iterations_per_epoch", "batch_size", "unlabeled_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.perturb_unlabeled and not method.perturbable:
            perturbable = [name for name, cls in METHOD_CLASSES.items() if cls.perturbable]
            raise ValueError(
                f"perturb_unlabeled applies to {', '.join(perturbable)}, not to {self.method!r}"
            )
        if not 0.0 <= self.unlabeled_cutout < 1.0:
            raise ValueError(f"unlabeled_cutout must be in [0, 1), got {self.unlabeled_cutout}")
        if self.unlabeled_cutout and not self.perturb_unlabeled:
            raise ValueError("unlabeled_cutout needs perturb_unlabeled")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {self.augmentation!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.min_ramp_iterations < 0:
            raise ValueError(f"min_ramp_iterations must be >= 0, got {self.min_ramp_iterations}")
        if self.supervised_warmup_iterations < 0:
            raise ValueError(
                "supervised_warmup_iterations must be >= 0, "
                f"got {self.supervised_warmup_iterations}"
            )
        if self.time_budget_minutes < 0:
            raise ValueError(f"time_budget_minutes must be >= 0, got {self.time_budget_minutes}")
        if self.cache_gb is not None and self.cache_gb <= 0:
            raise ValueError(f"cache_gb must be > 0 (or None for automatic), got {self.cache_gb}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1], got {self.shared_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        d = dataclasses.asdict(self)
        d["roi_size"] = list(self.roi_size)
        d["target_spacing"] = list(self.target_spacing) if self.target_spacing else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error that names them.

        Args:
            d: Settings, as written by :meth:`to_dict` (former names of settings, such as
                ``views`` for ``members``, are read as the new ones).
        """
        d = {RENAMED_SETTINGS.get(k, k): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig settings: {', '.join(unknown)}")
        return cls(**d)


def parse_intensity(spec: str) -> tuple[str, tuple[float, float] | None]:
    """Parse an intensity normalisation setting.

    Args:
        spec: ``"zscore"`` or ``"ct:LOW,HIGH"`` (e.g. ``"ct:-1000,1000"``).

    Returns:
        ``("zscore", None)`` or ``("ct", (low, high))``.
    """
    if spec == "zscore":
        return "zscore", None
    if spec.startswith("ct:"):
        try:
            low, high = (float(v) for v in spec[3:].split(","))
        except ValueError:
            raise ValueError(
                f"intensity {spec!r}: expected 'ct:LOW,HIGH', e.g. 'ct:-1000,1000'"
            ) from None
        if not low < high:
            raise ValueError(f"intensity {spec!r}: LOW must be below HIGH")
        return "ct", (low, high)
    raise ValueError(f"intensity must be 'zscore' or 'ct:LOW,HIGH', got {spec!r}")
