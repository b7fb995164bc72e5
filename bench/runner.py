"""How the quality benchmark trains: one run, the pool of worker processes, the rows they leave.

A *run* is one method spec at one label count and seed (:func:`run_one`); it trains on the
profile's training split and is evaluated on its test split, and gives one *row* (a dict,
one JSON line of ``bench/results/NAME.jsonl``). :func:`plan_runs` lists the runs of a
benchmark that have no row yet, so an interrupted benchmark continues where it stopped;
:func:`run_plan` trains them, several at a time when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeAlias

import torch
from profiles import Profile, Splits, parse_method, train_config

from cotrain.checkpoint import MODEL_FILE
from cotrain.engine import TrainCallback, Trainer, TrainState
from cotrain.evaluation import evaluate_predictor, validate_ensemble
from cotrain.inference import EnsemblePredictor

logger = logging.getLogger("bench.runner")

__all__ = [
    "Run",
    "RunRecord",
    "append_row",
    "claim_run_folder",
    "done_runs",
    "plan_runs",
    "read_rows",
    "run_folder",
    "run_one",
    "run_plan",
]

#: ``(method spec, label count, seed)`` of one run.
Run: TypeAlias = tuple[str, int, int]


class RunRecord(TrainCallback):
    """What a run leaves besides its model: its training seconds and, with ``curve_every``, its
    Dice-against-iterations curve; kept in ``progress.json`` of the run's folder after every
    epoch, so a run resumed in a later session (``--work``) continues both.

    The curve scores the members and their soft vote as they are at that iteration on the
    evaluation cases, on the preprocessed grid (:func:`cotrain.evaluation.validate_ensemble`).
    It reads no random numbers, so a run with a curve trains exactly as one without; its time
    is not training time.

    Args:
        trainer: The run's trainer (its ensemble, configuration and device are read).
        cases: ``{"image", "label"}`` cases scored (the run's test or tuning cases).
        curve_every: Iterations between two points (a multiple of the iterations per epoch;
            0: no curve).
        path: The ``progress.json`` to keep (read back when it exists), or ``None``.
    """

    def __init__(
        self,
        trainer: Trainer,
        cases: list[dict[str, str]],
        curve_every: int,
        path: Path | None = None,
    ) -> None:
        self.trainer = trainer
        self.cases = cases
        self.every = curve_every
        self.path = path
        saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.points: list[dict[str, Any]] = saved.get("dice_curve", [])
        #: Training seconds of this run so far, earlier sessions included.
        self.train_seconds: float = saved.get("train_seconds", 0.0)
        self._last = time.monotonic()

    def on_train_start(self, state: TrainState) -> None:
        # A run resumed from a checkpoint saved just before its curve point was scored (the
        # engine checkpoints, then ends the epoch) scores that point now.
        iteration = state.epoch * state.iterations_per_epoch
        scored = {p["iteration"] for p in self.points}
        if self.every and iteration and iteration % self.every == 0 and iteration not in scored:
            self._score(iteration)
        self._last = time.monotonic()

    def on_epoch_end(self, state: TrainState) -> None:
        self.train_seconds += time.monotonic() - self._last
        iteration = state.epoch * state.iterations_per_epoch
        if self.every and (iteration % self.every == 0 or state.epoch == state.total_epochs):
            self._score(iteration)
        if self.path is not None:
            progress = {"train_seconds": self.train_seconds, "dice_curve": self.points}
            self.path.write_text(json.dumps(progress))
        self._last = time.monotonic()

    def _score(self, iteration: int) -> None:
        """Add the curve point of the members as they are now."""
        t = self.trainer
        metrics = validate_ensemble(t.ensemble, self.cases, t.config, t.device, t.use_amp)
        self.points.append(
            {
                "iteration": iteration,
                "vote_dice": round(metrics["vote_dice"], 5),
                "member_dice": [round(d, 5) for d in metrics["member_dice"]],
                "disagreement": round(metrics["disagreement"], 6),
            }
        )
        self.points.sort(key=lambda p: p["iteration"])
        logger.info("iteration %d: vote Dice %.4f", iteration, metrics["vote_dice"])


def run_folder(work: Path, spec: str, num_labeled: int, seed: int) -> Path:
    """The folder of one run under ``work``: a readable prefix and a digest of the spec."""
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_]+", "-", spec.split(":")[0])
    return work / f"{name}-{digest}-l{num_labeled}-s{seed}"


#: The file in a run folder that says which run its progress belongs to.
RUN_IDENTITY_FILE = "run.json"


def claim_run_folder(folder: Path, identity: dict[str, Any]) -> Path:
    """Make ``folder`` the home of the run ``identity`` describes, and return it.

    A folder's name says the spec, label count and seed, not the split, the schedule or the
    cases: a stopped tuning-split run and a test-split run of the same spec (or a 1000- and a
    4000-iteration run) share it. Its :data:`RUN_IDENTITY_FILE` says whose progress it holds;
    another run's is removed (logged) so that it is never resumed with this run's data.
    A folder without the file (from before it existed) is kept.

    Args:
        folder: The run's folder (:func:`run_folder`).
        identity: JSON data that tells the run apart: its config and its cases.
    """
    wanted = json.loads(json.dumps(identity, sort_keys=True))
    marker = folder / RUN_IDENTITY_FILE
    if marker.exists():
        try:
            held = json.loads(marker.read_text())
        except ValueError:
            held = None
        if held != wanted:
            logger.warning("%s holds another run's progress; this run starts afresh", folder)
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(wanted, sort_keys=True))
    return folder


def run_one(
    profile: Profile,
    spec: str,
    num_labeled: int,
    seed: int,
    splits: Splits,
    device: str | None,
    curve_every: int = 0,
    work: Path | None = None,
) -> dict[str, Any]:
    """Train one method on one split and evaluate it on the test cases.

    The seed shuffles the training cases (the first ``num_labeled`` are labeled, the others
    unlabeled) and initialises the training; ``full`` trains the supervised ensemble on every
    training case.

    Args:
        profile: The benchmark setting.
        spec: A method spec (:func:`profiles.parse_method`).
        num_labeled: Labeled training cases (ignored by ``full``).
        seed: The run's seed.
        splits: Test, validation and training cases (:func:`profiles.split_cases`).
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when present).
        curve_every: Score the members on the test cases every this many iterations
            (:class:`RunRecord`; 0: only the final model). Its time is not training time.
        work: Train in a folder of this one (:func:`run_folder`) and resume what a stopped
            session left there (checkpoint, seconds, curve); the folder is removed once the
            row exists. ``None``: a temporary folder, so an interrupted run starts again.

    Returns:
        The run's row: its spec, label count and seed, the soft vote's Dice and HD95 and the
        members' mean Dice on the test cases, training times, final losses, learning
        curves (each epoch's mean loss terms) and, with ``curve_every``, the Dice curve.
    """
    test, validation, train = splits
    name, params = parse_method(spec)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if name == "full":
        labeled, unlabeled, method = train, [], "supervised"
    else:
        labeled = [train[i] for i in order[:num_labeled]]
        unlabeled = [{"image": train[i]["image"]} for i in order[num_labeled:]]
        method = name
    config = train_config(profile, method, params, seed)
    iterations = config.epochs * config.iterations_per_epoch
    logger.info("training %s, %d labeled, seed %d", spec, len(labeled), seed)
    with contextlib.ExitStack() as stack:
        if work is None:
            output = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            identity = {
                "config": config.to_dict(),
                "labeled": [case["image"] for case in labeled],
                "test": [case["image"] for case in test],
            }
            output = claim_run_folder(run_folder(work, spec, len(labeled), seed), identity)
        trainer = Trainer(
            config,
            labeled,
            unlabeled,
            output,
            validation=validation,
            device=device,
            resume=work is not None,
        )
        record = RunRecord(trainer, test, curve_every, output / "progress.json" if work else None)
        trainer.callbacks.append(record)
        state = trainer.fit()
        train_seconds = record.train_seconds
        predictor = EnsemblePredictor.load(output / MODEL_FILE, device=device)
        evaluation = evaluate_predictor(predictor, test)
    if work is not None:
        shutil.rmtree(output, ignore_errors=True)  # the row below is the run's record
    vote = evaluation["vote"]
    return {
        "method": spec,
        "labeled": len(labeled),
        "seed": seed,
        "iterations": iterations,
        "vote_dice": vote["mean_dice"],
        "vote_hd95": vote["mean_hd95"],
        "member_dice": evaluation["member_mean_dice"],
        "vote_dice_per_class": vote["dice"],
        "train_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(train_seconds / iterations, 3),
        "final_losses": state.losses,
        # Learning curves: each epoch's mean loss terms and weights, at the iteration it ended.
        "loss_history": [
            {
                "iteration": entry["epoch"] * config.iterations_per_epoch,
                **{k: round(v, 6) for k, v in entry["losses"].items()},
            }
            for entry in state.history
        ],
        **({"dice_curve": record.points} if curve_every else {}),
    }


def _share_threads(threads: int) -> None:
    """Worker initialiser: each run at the same time gets its share of the CPU threads.

    Args:
        threads: Torch threads of this worker process.
    """
    torch.set_num_threads(threads)


def run_plan(
    profile: Profile,
    plan: list[Run],
    splits: Splits,
    device: str | None,
    workers: int = 1,
    curve_every: int = 0,
    work: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Train the planned runs, ``workers`` at a time, and yield each result as its run ends.

    Args:
        profile: The benchmark setting.
        plan: ``(method spec, label count, seed)`` of each run.
        splits: Test, validation and training cases (:func:`profiles.split_cases`).
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when present).
        workers: Runs trained at the same time, each in its own process with
            ``cpu_count // workers`` threads (sharing the GPU when there is one).
        curve_every, work: See :func:`run_one`.

    Yields:
        Each run's row (:func:`run_one`), in the order the runs end.
    """
    if workers <= 1:
        for method, count, seed in plan:
            yield run_one(profile, method, count, seed, splits, device, curve_every, work)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_share_threads,
        initargs=(max(1, (os.cpu_count() or 1) // workers),),
    )
    try:
        futures = [
            pool.submit(run_one, profile, method, count, seed, splits, device, curve_every, work)
            for method, count, seed in plan
        ]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # A failed run (or Ctrl-C) stops the queued runs; the finished ones are already saved.
        pool.shutdown(wait=True, cancel_futures=True)


def plan_runs(
    profile: Profile, methods: Iterable[str], num_train: int, done: Iterable[Run] = ()
) -> list[Run]:
    """The benchmark's runs that have no row yet, fewest labels first.

    Every method runs at every label count and seed of the profile, except ``full``, which
    runs once per seed, with every training case labeled, when the profile's last label count
    comes. The targets are at the smallest label count, so all its seeds come first: a
    benchmark stopped part-way has the target rows complete before any other.

    Args:
        profile: The benchmark setting (its label counts and seeds).
        methods: Method specs.
        num_train: Training cases (the label count of ``full``).
        done: Runs that already have a row.

    Returns:
        ``(method spec, label count, seed)`` of each run to train.
    """
    methods, done = list(methods), set(done)
    plan = [
        (method, num_train if method == "full" else count, seed)
        for count in profile.label_counts
        for seed in profile.seeds
        for method in methods
        if method != "full" or count == profile.label_counts[-1]
    ]
    return [run for run in plan if run not in done]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file, in the order they were written (none if it does not exist).

    Args:
        path: A JSONL file, one row (:func:`run_one`) a line.
    """
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add one row to a results file as soon as its run ends, so no finished run is lost.

    Args:
        path: A JSONL file (created if missing).
        row: The run's row (:func:`run_one`).
    """
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def done_runs(rows: Iterable[dict[str, Any]]) -> set[Run]:
    """The runs that have a row, to leave out of :func:`plan_runs`.

    Args:
        rows: Rows of a results file.
    """
    return {(r["method"], r["labeled"], r["seed"]) for r in rows}
