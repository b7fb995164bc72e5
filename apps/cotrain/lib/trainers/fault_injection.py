"""TEST HOOK: make a training run fail on purpose, to test what a failure leaves behind.

Off unless the server was started with ``--conf test_fault_injection true``; then a train
request may carry ``{"test_fault": FAULT}`` (``POST /train/MODEL`` with that JSON body):

- ``exception``: the run raises :class:`InjectedFault` after its first iteration;
- ``nan_loss``: every member weight is set to NaN before the first step, so the first loss is
  NaN and the engine's own check stops the run (``FloatingPointError``);
- ``slow``: every iteration sleeps :data:`SLOW_ITERATION_S` more, so a run lasts a known time
  without using the CPU (to test what happens while a training runs).

Never enable it on a server that annotators use: any client could then fail its trainings.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from cotrain.engine import TrainCallback, Trainer, TrainState

logger = logging.getLogger(__name__)

#: Faults a train request may ask for.
FAULTS = ("exception", "nan_loss", "slow")
#: Extra seconds per iteration of the ``slow`` fault.
SLOW_ITERATION_S = 0.25
#: The train request key naming the fault.
REQUEST_KEY = "test_fault"


class InjectedFault(RuntimeError):
    """The failure the ``exception`` fault raises."""


class FaultInjector(TrainCallback):
    """Fails a run as :data:`FAULTS` describe.

    Args:
        fault: One of :data:`FAULTS`.
        trainer: The run's trainer (its ensemble is poisoned for ``nan_loss``).
    """

    def __init__(self, fault: str, trainer: Trainer) -> None:
        self.fault = fault
        self.trainer = trainer

    def on_train_start(self, state: TrainState) -> None:
        if self.fault == "nan_loss":
            logger.warning("test hook: setting every member weight to NaN")
            with torch.no_grad():
                for parameter in self.trainer.ensemble.parameters():
                    parameter.fill_(float("nan"))

    def on_iteration_end(self, state: TrainState) -> None:
        if self.fault == "slow":
            time.sleep(SLOW_ITERATION_S)
        if self.fault == "exception":
            raise InjectedFault(
                f"test hook: injected failure at epoch {state.epoch + 1}, "
                f"iteration {state.iteration}"
            )


def requested_fault(request: dict[str, Any], enabled: bool) -> str | None:
    """The fault a train request asks for, or ``None``.

    Raises:
        ValueError: If one is asked for while the hook is off, or it is unknown.
    """
    fault = request.get(REQUEST_KEY)
    if fault is None:
        return None
    if not enabled:
        raise ValueError(
            f"train request asks for {REQUEST_KEY}={fault!r}, but fault injection is off "
            "(a test hook: start the server with --conf test_fault_injection true)"
        )
    if fault not in FAULTS:
        raise ValueError(f"unknown {REQUEST_KEY} {fault!r}; choose one of {', '.join(FAULTS)}")
    return str(fault)
