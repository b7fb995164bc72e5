"""The training engine: one loop for every method (nnU-Net-style trainer with small hooks).

A run: build the ensemble (optionally warm-started from a served model), the method, the
optimiser and LR schedule; then for each epoch, ``iterations_per_epoch`` steps of
``method.loss_terms`` -> weighted sum -> backward -> step -> ``method.after_member_step``;
validate (Dice of each member and of the soft vote, members' disagreement); save a resumable
``checkpoint.pt``. Only when every epoch completed is ``model.pt`` published, atomically (the
best validated ensemble, or the last one without validation).

The loop lives here; the batches come from :mod:`cotrain.streams`, the validation from
:mod:`cotrain.evaluation`, and what checkpoint and model files hold from :mod:`cotrain.checkpoint`.
Progress reaches callers through :class:`TrainCallback` objects carrying a :class:`TrainState`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.utils import set_determinism

from cotrain.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    continue_method,
    publish_weights,
    restore_checkpoint,
    save_checkpoint,
    warm_start,
)
from cotrain.config import TrainConfig
from cotrain.distributed import (
    agree_with_main_process,
    all_reduce_gradients,
    check_replicas_identical,
    is_main_process,
)
from cotrain.evaluation import validate_ensemble
from cotrain.inference import default_device
from cotrain.methods import Batch, CoTrainingMethod, build_method
from cotrain.networks import Ensemble
from cotrain.schedules import PolynomialWarmupLR
from cotrain.streams import BatchStreams

logger = logging.getLogger(__name__)

#: Steps timed (after a first warm-up step) before a time budget plans the run's length.
BUDGET_PROBE_STEPS = 3
#: A run planned as one shortened epoch (its budget holds less than one) re-plans every this
#: many steps from the mean step time so far, so that a machine that slows down (another job,
#: a larger batch of data) still ends within the budget; longer runs re-plan after each epoch.
BUDGET_REPLAN_STEPS = 5

__all__ = [
    "TrainCallback",
    "TrainState",
    "Trainer",
    "TrainingStopped",
]


class TrainingStopped(RuntimeError):
    """Raised by :meth:`Trainer.fit` when :meth:`Trainer.request_stop` ended the run early."""


@dataclass
class TrainState:
    """Where a run is; handed to every callback.

    Attributes:
        epoch: Epochs completed (1-based once the first one ends; 0 before).
        total_epochs: Epochs of the run.
        iteration: Iteration within the current epoch.
        iterations_per_epoch: Iterations per epoch.
        losses: Latest value of each loss term (unweighted), ``"total"``, the weights
            (``"weight/NAME"``) and method extras (e.g. ``"critic"``); epoch means at epoch end.
        metrics: Latest validation: ``"vote_dice"``, ``"member_dice"`` (list), ``"disagreement"``
            (members' mean Jensen-Shannon divergence, nats), ``"vote_dice_per_class"`` (dict).
        best_metric: Best soft-vote validation Dice so far (-1 before any validation).
        best_epoch: Epoch of ``best_metric``.
        elapsed_s: Seconds since the run started.
        history: One dict per completed epoch: losses and metrics.
        continued: The run warm-started from a served model of the same method and carries
            its method's state (a critic, EMA teachers); its ramps continue (see
            :meth:`Trainer.ramp_progress`).
        trained_before: Iterations the continued model had been trained for, over the runs
            that made it (0 for a fresh run; ``None``: a model published before it was
            recorded).
        iterations_done: Optimiser steps this run has taken.
    """

    epoch: int = 0
    total_epochs: int = 0
    iteration: int = 0
    iterations_per_epoch: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    best_metric: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    continued: bool = False
    trained_before: int | None = 0
    iterations_done: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


class TrainCallback:
    """Receives progress. Override any of the methods; the defaults do nothing."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_iteration_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class Trainer:
    """Trains a k-member ensemble with one co-training method.

    Args:
        config: The run's settings.
        labeled: ``{"image": path, "label": path}`` per labeled case.
        unlabeled: ``{"image": path}`` per unlabeled case (their labels are never read). When
            empty, the labeled images double as unlabeled data.
        output_dir: Where ``checkpoint.pt`` and, on success, ``model.pt`` are written.
        validation: ``{"image", "label"}`` cases to validate on, or ``None``.
        callbacks: Progress receivers.
        init_model: A ``model.pt`` to warm-start the members from; if it cannot be read, its
            previous version (``NAME.prev.pt``, see :func:`cotrain.checkpoint.publish_model`).
            Skipped with a warning if neither can be read or the architecture differs.
        device: ``"cuda"``/``"cpu"``; CUDA when present by default.
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists.
    """

    def __init__(
        self,
        config: TrainConfig,
        labeled: Sequence[dict[str, str]],
        unlabeled: Sequence[dict[str, str]],
        output_dir: str | Path,
        validation: Sequence[dict[str, str]] | None = None,
        callbacks: Sequence[TrainCallback] = (),
        init_model: str | Path | None = None,
        device: str | torch.device | None = None,
        resume: bool = False,
    ) -> None:
        if not labeled:
            raise ValueError("training needs at least one labeled case")
        missing = [c.get("image") for c in labeled if "label" not in c]
        if missing:
            raise ValueError(f"labeled cases without a label: {missing[:3]}")
        self.config = config
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled)
        self.validation = list(validation or [])
        self.output_dir = Path(output_dir)
        self.callbacks = list(callbacks)
        self.init_model = Path(init_model) if init_model else None
        self.device = torch.device(device) if device is not None else default_device()
        self.resume = resume
        self.state = TrainState(
            total_epochs=config.epochs, iterations_per_epoch=config.iterations_per_epoch
        )
        self._stop = threading.Event()
        self._best_weights: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- hooks (override to customise)
    def clock(self) -> float:
        """Seconds on a monotonic clock: what the run's elapsed time and its time budget are
        measured with (a test replaces it with a simulated machine's clock)."""
        return time.monotonic()

    def build_ensemble(self) -> Ensemble:
        c = self.config
        ensemble = Ensemble(
            c.members, c.spatial_dims, 1, c.num_classes, seed=c.seed, network=c.network
        )
        ensemble.stacked = c.stack_members
        return ensemble

    def build_method(self) -> CoTrainingMethod:
        c = self.config
        return build_method(
            c.method, c.members, c.spatial_dims, 1, c.num_classes, c.method_params, c.seed
        )

    def build_optimizer(self, ensemble: Ensemble) -> torch.optim.Optimizer:
        """AdamW, or SGD with Nesterov momentum 0.99 as nnU-Net (``config.optimizer``)."""
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(
                ensemble.parameters(),
                lr=c.learning_rate,
                momentum=0.99,
                nesterov=True,
                weight_decay=c.weight_decay,
            )
        return torch.optim.AdamW(
            ensemble.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay
        )

    def build_lr_scheduler(
        self, optimizer: torch.optim.Optimizer, warm_started: bool = False
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """Polynomial decay (power 0.9) over all iterations, as in nnU-Net; a warm-started
        run first warms up linearly over 5% of its iterations (at most 50)."""
        total = self.config.epochs * self.config.iterations_per_epoch
        warmup = min(50, total // 20) if warm_started else 0
        return PolynomialWarmupLR(optimizer, total_iters=total, warmup_iters=warmup)

    def build_streams(self) -> BatchStreams:
        """The run's batches (see :class:`cotrain.streams.BatchStreams`)."""
        c = self.config
        streams = BatchStreams(
            c, self.labeled, self.unlabeled, self.method.uses_unlabeled, self.device
        )
        logger.info(
            "training %s: %d members, %d labeled (subsets of %s cases), %d unlabeled, "
            "%d validation, device %s",
            c.method,
            c.members,
            len(self.labeled),
            [len(s) for s in streams.subsets],
            len(self.unlabeled),
            len(self.validation),
            self.device,
        )
        return streams

    # ----------------------------------------------------------------- public API
    def request_stop(self) -> None:
        """Ask the run to stop after the current iteration; :meth:`fit` then raises
        :class:`TrainingStopped` and publishes nothing."""
        self._stop.set()

    def setup(self) -> tuple[int, BatchStreams]:
        """Everything :meth:`fit` does before its loop: seeds (and cuDNN's mode), the
        ensemble, the method, the optimiser and its schedule, AMP, a resumed checkpoint or a
        warm start, and the data streams.

        Returns:
            The first epoch to train (0, or where a resumed run stopped) and the streams.
        """
        c = self.config
        set_determinism(seed=c.seed)  # seeds every generator, and makes cuDNN deterministic
        if not c.deterministic:
            torch.backends.cudnn.deterministic = False
            torch.backends.cudnn.benchmark = True  # fastest kernels for the fixed patch size
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ensemble = self.build_ensemble().to(self.device)
        self.method = self.build_method()
        self.method.attach(self.ensemble)
        self.method.to(self.device)
        self.method.reduce_gradients = all_reduce_gradients
        self.optimizer = self.build_optimizer(self.ensemble)
        self.lr_scheduler = self.build_lr_scheduler(self.optimizer)
        self.use_amp = self.device.type == "cuda" and c.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        first_epoch = self._restore()
        self._max_epochs = c.epochs
        if c.time_budget_minutes and first_epoch:  # resumed: the length its budget planned
            self._set_length(self.state.total_epochs, self.state.iterations_per_epoch)
        return first_epoch, self.build_streams()

    def fit(self) -> TrainState:
        """Run the training and publish ``model.pt``.

        Returns:
            The final state.

        Raises:
            FloatingPointError: If a loss or a weight to publish becomes NaN or infinite
                (nothing is published).
            TrainingStopped: If :meth:`request_stop` was called (nothing is published).
        """
        c = self.config
        start = self.clock()
        first_epoch, streams = self.setup()
        self._emit("on_train_start")
        loop_start = self.clock() - start  # data caching done: epochs are timed from here
        epoch_start = loop_start
        epoch = first_epoch
        while epoch < self.config.epochs:
            self._train_epoch(epoch, streams, start)
            if (
                is_main_process()
                and self.validation
                and c.val_interval
                and ((epoch + 1) % c.val_interval == 0 or epoch + 1 == self.config.epochs)
            ):
                self._validate()
            self.state.epoch = epoch + 1
            self.state.elapsed_s = self.clock() - start
            self.state.history.append(
                {
                    "epoch": epoch + 1,
                    "losses": dict(self.state.losses),
                    "metrics": dict(self.state.metrics),
                }
            )
            if c.time_budget_minutes:
                # The slower of the mean epoch and the last one: a machine that slows down (another
                # job starts) is followed within one epoch, so the run is shortened while its
                # learning rate can still decay, not cut after its last planned step.
                mean_epoch = (self.state.elapsed_s - loop_start) / (epoch + 1 - first_epoch)
                last_epoch = self.state.elapsed_s - epoch_start
                self.fit_to_budget(self.state.elapsed_s, max(mean_epoch, last_epoch), per="epoch")
            epoch_start = self.state.elapsed_s
            if is_main_process():
                self._save_checkpoint()
            self._emit("on_epoch_end")
            epoch += 1
        check_replicas_identical(self.ensemble)
        if is_main_process():
            self._publish()
        self.state.elapsed_s = self.clock() - start
        self._emit("on_train_end")
        return self.state

    # ----------------------------------------------------------------- internals
    def _emit(self, event: str) -> None:
        if not is_main_process():
            return
        for callback in self.callbacks:
            getattr(callback, event)(self.state)

    def train_step(
        self, batch: Batch, progress: float, every_term: bool = False, warmup: bool = False
    ) -> dict[str, float]:
        """One optimiser step of the members (and the method's own step).

        Args:
            batch: The step's data.
            progress: Fraction of the run done (the terms' ramps follow from it,
                :meth:`ramp_progress`).
            every_term: Compute every loss term that is on by the end of the run, also those
                whose weight is still 0 this step (they add nothing to the gradient; the step
                then costs what a later one does).
            warmup: A step of the supervised warm-up (:meth:`in_warmup`): the supervised term
                alone (``method.warmup_terms``), every other weight reported as 0.

        Returns:
            The reported values.
        """
        self.ensemble.train()
        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        weights = self.method.loss_weights(self.ramp_progress(progress))
        if warmup:
            weights = {name: 1.0 if name == "supervised" else 0.0 for name in weights}
        work = weights
        if every_term:  # each term's weight where its ramp will be at the end of the run
            at_end = self.method.loss_weights(self.ramp_progress(1.0))
            work = {name: max(w, at_end.get(name, w)) for name, w in weights.items()}
        with torch.autocast(self.device.type, enabled=self.use_amp):
            if warmup:
                terms = self.method.warmup_terms(self.ensemble, batch)
            else:
                terms = self.method.loss_terms(self.ensemble, batch, work)
        total = sum(weights[name] * term.float() for name, term in terms.items())
        if not torch.isfinite(total):
            values = {name: float(term.detach()) for name, term in terms.items()}
            raise FloatingPointError(
                f"loss is not finite at epoch {self.state.epoch + 1}, iteration {self.state.iteration}: {values}"
            )
        self.scaler.scale(total).backward()
        all_reduce_gradients(self.ensemble)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        if warmup:
            extras = self.method.after_warmup_step(self.ensemble, batch)
        else:
            extras = self.method.after_member_step(self.ensemble, batch)
        reported = {name: float(term.detach()) for name, term in terms.items()}
        reported["total"] = float(total.detach())
        reported.update({f"weight/{name}": w for name, w in weights.items()})
        reported.update(extras)
        return reported

    def ramp_progress(self, progress: float) -> float:
        """Where the method's ramp-ups are (the ``progress`` of :meth:`loss_weights`) when
        this run is ``progress`` of the way through.

        A fresh run's ramps span ``max(T, N)`` iterations, ``T`` the run's planned length and
        ``N`` = ``config.min_ramp_iterations``: ``progress`` itself when ``T >= N``. A run that
        continues a model trained for ``B`` iterations (``TrainState.trained_before``) is at
        ``(B + progress T) / max(B + T, N)``, capped at 1; with ``N = 0`` (or ``B`` unknown)
        at 1, the ramps having been completed by the run that made the model.
        """
        c = self.config
        before = self.state.trained_before  # 0 unless the run continues a model
        if self.state.continued and (c.min_ramp_iterations == 0 or before is None):
            return 1.0
        total = c.epochs * c.iterations_per_epoch
        span = max(c.min_ramp_iterations, before + total)
        return min(1.0, (before + progress * total) / span)

    def in_warmup(self) -> bool:
        """Whether the next step is one of the supervised warm-up's: the model (counted over
        the retrains that continue it, as :meth:`ramp_progress`) has trained fewer than
        ``config.supervised_warmup_iterations`` iterations. Never for a method without
        unlabeled terms, nor for a continued model whose past is unknown."""
        before = self.state.trained_before
        if not self.method.uses_unlabeled or before is None:
            return False
        return before + self.state.iterations_done < self.config.supervised_warmup_iterations

    def _train_epoch(self, epoch: int, streams: BatchStreams, start: float) -> None:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        iteration = 0
        probe_start, probe_from = 0.0, 0  # the budget's timed steps start at step probe_from
        warmup = False  # whether the step before was one of the supervised warm-up's
        while iteration < self.config.iterations_per_epoch:  # a time budget may shorten it
            c = self.config
            if self._stop.is_set():
                raise TrainingStopped(f"stopped at epoch {epoch + 1}, iteration {iteration}")
            progress = (epoch + iteration / c.iterations_per_epoch) / c.epochs
            previous, warmup = warmup, self.in_warmup()
            if epoch == 0 and previous and not warmup:
                # The warm-up ended in the first epoch: its cheap steps say nothing of the
                # method's own, so the plan is made again from the steps that follow.
                probe_from = iteration
            batch = streams.next_batch(unlabeled=not warmup)
            # The steps a time budget is planned from do the work of every term that is on by
            # the end of the run, also a term whose weight is still 0 (DCT-Seg's diversity in
            # the first 10%): planned from cheaper steps, the run would stop well before its
            # budget. A term a short run never ramps up to (min_ramp_iterations) is not priced.
            probing = (
                bool(c.time_budget_minutes)
                and epoch == 0
                and not warmup
                and iteration - probe_from <= BUDGET_PROBE_STEPS
            )
            reported = self.train_step(batch, progress, every_term=probing, warmup=warmup)
            self.state.iterations_done += 1
            for name, value in reported.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            iteration += 1
            self.state.iteration = iteration
            self.state.losses = reported
            self.state.elapsed_s = self.clock() - start
            if c.time_budget_minutes and epoch == 0 and iteration == probe_from + 1:
                probe_start = self.state.elapsed_s  # the first step warms up: not measured
            timed = iteration - probe_from - 1  # steps since that first step
            if (
                c.time_budget_minutes
                and epoch == 0
                and timed >= BUDGET_PROBE_STEPS
                and (
                    timed == BUDGET_PROBE_STEPS
                    or (c.epochs == 1 and timed % BUDGET_REPLAN_STEPS == 0)
                )
            ):
                seconds_per_step = (self.state.elapsed_s - probe_start) / timed
                self.fit_to_budget(self.state.elapsed_s, seconds_per_step, per="step")
            self._emit("on_iteration_end")
        # Each value's mean over the steps that reported it (warm-up steps have no unlabeled terms).
        self.state.losses = {name: total / counts[name] for name, total in sums.items()}
        self.state.losses["learning_rate"] = self.lr_scheduler.get_last_lr()[0]

    def fit_to_budget(self, elapsed_s: float, seconds: float, per: str) -> None:
        """Shorten the run so that it ends within ``config.time_budget_minutes``.

        Called after the first few steps (``per="step"``: the measured seconds per step; again
        every :data:`BUDGET_REPLAN_STEPS` steps while the run is one shortened epoch) and after
        every epoch (``per="epoch"``: the slower of the mean epoch so far and the last one,
        validation included),
        so the plan follows the machine's real speed. The run never grows beyond
        its configured epochs, and runs at least the epoch it is in; planned from its first
        steps, its epochs are shortened alike so that it fills the budget rather than ending
        at the last whole epoch that fits. The learning-rate schedule and the methods' ramps
        span the planned length.

        Args:
            elapsed_s: Seconds since the run started (data caching included).
            seconds: Measured seconds per step or per epoch.
            per: ``"step"`` or ``"epoch"``.
        """
        c = self.config
        left = c.time_budget_minutes * 60.0 - elapsed_s
        epochs, iterations_per_epoch = c.epochs, c.iterations_per_epoch
        if per == "step":
            spent = seconds * self.state.iteration  # this epoch's steps so far
            if seconds * c.iterations_per_epoch > left + spent:
                # Not even one epoch fits: one shorter epoch, ending within the budget (or now,
                # when setting up took it all: never fewer steps than were done).
                steps = max(int(left / seconds), 0) + self.state.iteration
                epochs, iterations_per_epoch = 1, min(steps, c.iterations_per_epoch)
            else:
                # As many epochs as hold the steps that fit, shortened alike so that the run
                # fills its budget instead of stopping at the last whole epoch.
                steps = int((left + spent) / seconds)
                epochs = min(self._max_epochs, math.ceil(steps / c.iterations_per_epoch))
                if epochs < self._max_epochs:
                    iterations_per_epoch = max(self.state.iteration, steps // epochs, 1)
        else:
            epochs = self.state.epoch + int(left / seconds)
        epochs = max(self.state.epoch, 1, min(self._max_epochs, epochs))
        # Every process trains as long as the main one planned (it alone validates).
        self._set_length(*agree_with_main_process([epochs, iterations_per_epoch], self.device))

    def _set_length(self, epochs: int, iterations_per_epoch: int) -> None:
        """Set the run's planned length (the state, the configuration it publishes with, and
        the learning-rate schedule's end); logged when it changes."""
        if (epochs, iterations_per_epoch) != (self.config.epochs, self.config.iterations_per_epoch):
            logger.info(
                "time budget %.1f min: training %d epochs x %d iterations (planned %d x %d)",
                self.config.time_budget_minutes,
                epochs,
                iterations_per_epoch,
                self.config.epochs,
                self.config.iterations_per_epoch,
            )
        self.config = dataclasses.replace(
            self.config, epochs=epochs, iterations_per_epoch=iterations_per_epoch
        )
        self.state.total_epochs = epochs
        self.state.iterations_per_epoch = iterations_per_epoch
        self.lr_scheduler.total_iters = epochs * iterations_per_epoch

    def _validate(self) -> None:
        """Dice of each member and of the soft vote on the validation cases; keeps the best."""
        self.state.metrics = validate_ensemble(
            self.ensemble, self.validation, self.config, self.device, self.use_amp
        )
        vote_dice = self.state.metrics["vote_dice"]
        if vote_dice > self.state.best_metric:
            self.state.best_metric = vote_dice
            self.state.best_epoch = self.state.epoch + 1
            self._best_weights = {
                k: v.detach().cpu().clone() for k, v in self.ensemble.state_dict().items()
            }
        logger.info(
            "validation: vote Dice %.4f, members %s, disagreement %.5f",
            vote_dice,
            [round(d, 4) for d in self.state.metrics["member_dice"]],
            self.state.metrics["disagreement"],
        )

    def _training_parts(self) -> dict[str, Any]:
        """The objects besides the members and the method that a checkpoint holds, by key."""
        return {
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "scaler": self.scaler,
        }

    def _save_checkpoint(self) -> None:
        save_checkpoint(
            self.output_dir / CHECKPOINT_FILE,
            self.config,
            self.ensemble,
            self.state,
            self._training_parts(),
            self.method,
            self._best_weights,
        )

    def _restore(self) -> int:
        """Load a checkpoint to resume, or warm-start weights; returns the first epoch to run."""
        checkpoint = self.output_dir / CHECKPOINT_FILE
        if self.resume and checkpoint.exists():
            state, self._best_weights = restore_checkpoint(
                checkpoint,
                self.config,
                self.ensemble,
                self._training_parts(),
                self.method,
                self.device,
            )
            self.state = TrainState(**state)
            return self.state.epoch
        if self.init_model is None or not self.init_model.exists():
            return 0
        payload = warm_start(self.init_model, self.ensemble, self.device)
        if payload is not None:
            self.method.attach(self.ensemble)  # e.g. teachers start from the warm weights
            self.method.to(self.device)
            # Then what the served model's run left of the method's own state (a critic, EMA
            # teachers), when it was trained by the same method: the retrain continues it.
            self.state.continued = continue_method(payload, self.method, self.config.method)
            if self.state.continued:
                self.state.trained_before = payload.get("trained_iterations")
            self.lr_scheduler = self.build_lr_scheduler(self.optimizer, warm_started=True)
        return 0

    def _publish(self) -> None:
        """Write ``model.pt`` (best validated weights, or the last ones) atomically.

        Raises:
            FloatingPointError: If a weight is NaN or infinite (nothing is written).
        """
        weights = (
            self._best_weights if self._best_weights is not None else self.ensemble.state_dict()
        )
        path = publish_weights(
            self.output_dir / MODEL_FILE,
            self.config,
            self.ensemble,
            weights,
            self.state,
            method=self.method,  # for the next retrain to continue from
        )
        logger.info(
            "published %s (best vote Dice %.4f at epoch %d)",
            path,
            self.state.best_metric,
            self.state.best_epoch,
        )
