"""Annotation session benchmark: the radiologist's loop on the real server, arm against arm.

What it measures: how the served model improves as labels are submitted one cycle after
another, and what each cycle costs, on a real MONAI Label server driven only through
``MONAILabelClient`` (as 3D Slicer drives it). An *arm* is a served model and an
active-learning strategy, ``MODEL:STRATEGY``: ``dct_seg:disagreement`` (the app's strategy),
``supervised:random`` (MONAI Label's stock ``random``), ...; ``client_random`` picks a seeded
random unlabeled image on the client instead (the same picks for every model of a seed).

For each arm and seed a fresh server (``monailabel start_server`` with the cotrain app, one
model) opens a studies folder of ``--pool-cases`` (160) hippocampus cases; ``--scoring-cases``
(40) other cases, a fixed seeded split by case name, never enter it and are used for scoring
only. ``--start-labels`` (4, seeded) of the folder's cases start with their label in
``labels/final``, so the server starts the first training itself (time budget
``first_train_minutes`` = 2 x ``--retrain-minutes``). Then each cycle:

1. ``--step`` (2) times: ``client.next_sample(STRATEGY)`` and ``client.save_label`` of that
   case's ground truth (each submit starts, queues or coalesces a retrain on the server);
2. wait until no training runs or waits, the train stats say ``DONE`` for a run that saw every
   submitted label, and (``disagreement``) every unlabeled image is scored with that model;
3. auto-segment each scoring case through the server: ``client.infer(model, "", {},
   file=IMAGE)`` uploads the image, which MONAI Label's ``/infer`` endpoint keeps in a temporary
   file that it deletes after answering (it never enters the datastore), and score the soft
   vote against the truth (``cotrain.metrics.dice_and_hd95``).

Recorded per cycle: the labels submitted, the chosen cases, the served model's ``mtime_ns``
(checked to change after the cycle's last submit: no cycle scores a stale model), mean Dice
and HD95, seconds from the last submit to the published model (the model file's mtime), the
trainings the submits caused, the seconds of scoring and the median seconds per auto-segment
request, peak RSS of the server process and of the training (and scoring) subprocesses
(``psutil``, sampled every 0.5 s), the train stats' planned iterations. The model's recipe is
the quality benchmark's quick one (``bench/profiles.py``: 40x56x40 whole volumes, UNet 16-128,
2 members, 2 + 2 per batch, lr 1e-3), 100 epochs of 50 iterations, so the time budget bounds
every run; no validation split (every label trains).

    python bench/session.py                                # 4 arms, seed 0: about 4.5 hours on 2 CPU cores
    python bench/session.py --quick --output /tmp/session  # the CI smoke test, 1.5 minutes

``--conf KEY VALUE`` (repeatable) sets a server ``--conf`` over the recipe for every arm, e.g.
``--conf supervised_warmup_iterations 300``; give such a run its own ``--name``.

Files: ``OUTPUT/session-NAME.{jsonl,csv,md,png}``, ``NAME`` = ``DATA-Rmin`` (``hippocampus-8min``;
``quick`` with ``--quick``). ``NAME.jsonl``: one row per arm, seed and cycle, appended as each
cycle ends, and one ``end`` row per finished arm and seed. A re-run skips finished arms and
seeds; an unfinished one is restarted from scratch (its rows are dropped: a session cannot be
resumed half way, as its server's models and scores are gone). ``NAME.md``: Dice and HD95 per
arm at each label count (mean over seeds), the times, and the targets: label efficiency (the
label count at which ``dct_seg:disagreement`` first reaches ``supervised:random``'s Dice at
``--max-labels``), ``dct_seg:disagreement`` at or above ``supervised:random`` at every count
from the first retrain on (the worst margin per seed too), and submit -> published within
``retrain_minutes`` + 60 s. ``NAME.png``: Dice against labels, and the time of each cycle.
``--merge OTHER ...`` takes the finished runs of this session's arms and seeds that other
sessions hold (a seed run earlier under another name; same budget and label schedule) as
done: they are not run again and count in the report, each named with its command;
``NAME.jsonl`` keeps only this session's own rows.

How long (R = ``--retrain-minutes``, 8): per arm, the server start and the first training
(2 x R = 16 minutes), then (max - start) / step = 6 cycles of about R each: the cycle's
first submit starts a retrain and the second, a second later, starts no second one
("trainings per cycle" in the report: 1 in ``session-r1.5-arms``), plus the scoring (40 auto-segment requests,
about 7 s, and with ``disagreement`` the scores of ~150 unlabeled images). Measured with R =
1.5: 12-17 minutes per arm (``bench/results/session-r1.5-arms.md``); with R = 8, 65 minutes per
arm (``bench/results/session-r8-1thread.md``), about 4.5 hours for the 4 arms and one seed, one
arm at a time.
``--quick``: 8 synthetic 24^3 cases (6 in the folder, 2 for scoring), a 2-level UNet, 2
cycles of 1 label from 2, arms ``dct_seg:disagreement supervised:random``: checks the path,
not the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from profiles import PROFILES
from server_memory import MemorySampler
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cotrain.data import list_msd_cases  # noqa: E402
from cotrain.metrics import dice_and_hd95, load_reference, mean_over_cases  # noqa: E402
from cotrain.studies import FINAL_LABELS_DIR  # noqa: E402
from cotrain.synthetic import write_synthetic_msd  # noqa: E402
from tests.app_helpers import (  # noqa: E402
    NO_SCORING_ENV,
    MonaiLabelServer,
    copy_app,
    train_finished,
    wait_for,
)

logger = logging.getLogger("bench.session")

#: Where the results go by default: ``bench/results``.
RESULTS = Path(__file__).resolve().parent / "results"
#: One row of ``session-NAME.jsonl``.
Row = dict[str, Any]

DEFAULT_ARMS = [
    "dct_seg:disagreement",
    "supervised:random",
    "dct_seg:random",
    "supervised:disagreement",
]
QUICK_ARMS = ["dct_seg:disagreement", "supervised:random"]
#: Strategies served by the app (``init_strategies``: the app's ``disagreement`` and
#: ``expected_error``, MONAI Label's ``random`` and ``first``) and the client-side seeded pick.
SCORED_STRATEGIES = ("disagreement", "expected_error")
SERVER_STRATEGIES = (*SCORED_STRATEGIES, "random", "first")
CLIENT_RANDOM = "client_random"
#: The arms compared by the label-efficiency target: (the issue's candidate, reference). Every
#: other co-trained arm in a report is judged against the reference the same way.
EFFICIENCY_ARMS = ("dct_seg:disagreement", "supervised:random")
#: What a row keeps of a strategy's answer (the app's strategies also send the image's info).
ANSWER_KEYS = ("id", "disagreement", "expected_error", "weight")
#: Seed of the fixed split into the studies pool and the scoring cases.
SPLIT_SEED = 0
#: Slack over the time budgets while waiting for a model: server start, subprocess imports,
#: data caching, publishing (seconds).
WAIT_SLACK_S = 600.0
#: Slack of the submit -> published target over ``retrain_minutes`` (seconds).
PUBLISH_TARGET_SLACK_S = 60.0
#: Labels of the hippocampus cases.
HIPPOCAMPUS_LABELS = {"anterior": 1, "posterior": 2}


@dataclass(frozen=True)
class Arm:
    """One arm of the session: the served model and the strategy proposing the next case.

    Attributes:
        model: A model the app serves (``dct_seg``, ``duo_segnet``, ``supervised``).
        strategy: ``disagreement``, ``random``, ``first`` (the server's) or ``client_random``.
    """

    model: str
    strategy: str

    @property
    def spec(self) -> str:
        """``MODEL:STRATEGY``."""
        return f"{self.model}:{self.strategy}"


def parse_arm(spec: str) -> Arm:
    """Read ``MODEL:STRATEGY``.

    Raises:
        ValueError: If the model or strategy is unknown.
    """
    model, _, strategy = spec.partition(":")
    models = ("dct_seg", "duo_segnet", "supervised")
    if model not in models:
        raise ValueError(f"arm {spec!r}: model must be one of {models}")
    strategies = (*SERVER_STRATEGIES, CLIENT_RANDOM)
    if strategy not in strategies:
        raise ValueError(f"arm {spec!r}: strategy must be one of {strategies}")
    return Arm(model, strategy)


@dataclass
class Settings:
    """One session's settings (the command line's, after ``--quick`` filled in its own).

    Attributes:
        name: Results are ``OUTPUT/session-NAME.*``.
        data: The MSD folder (``imagesTr``, ``labelsTr``); ``None``: ``--quick``'s synthetic cases.
        arms: The arms, in run order.
        seeds: The seeds (they pick the start labels and the models' initialisation).
        labels: Label names to values.
        retrain_minutes: Time budget of every retrain (the first training: twice that).
        start_labels: Labels in the folder when the server starts.
        max_labels: The session ends at this many labels.
        step: Labels submitted per cycle.
        pool_cases: Cases in the studies folder.
        scoring_cases: Cases kept out of the folder, for scoring only.
        train: ``--conf`` of the model's recipe.
        overrides: ``--conf`` settings given on the command line (over ``train``; shown in
            the report).
        threads: ``OMP_NUM_THREADS`` of the server and its subprocesses (``None``: unset).
        output: Folder of the results.
        work: Folder of the studies folders, app copies and server logs (kept when given).
        quick: The smoke-test sizes.
        merge: Other sessions (``NAME``s in ``output``) whose finished arm and seed runs the
            report counts beside this session's own (e.g. a seed run earlier under another
            name); only arms of this session, same budget and label schedule.
    """

    name: str
    data: Path | None
    arms: list[Arm]
    seeds: list[int]
    labels: dict[str, int]
    retrain_minutes: float
    start_labels: int
    max_labels: int
    step: int
    pool_cases: int
    scoring_cases: int
    train: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    output: Path = RESULTS
    work: Path | None = None
    quick: bool = False
    merge: list[str] = field(default_factory=list)

    @property
    def first_train_minutes(self) -> float:
        """The first training's budget: twice a retrain's."""
        return 2.0 * self.retrain_minutes

    @property
    def cycles(self) -> int:
        """Cycles of one arm and seed, the first training's (cycle 0) included."""
        return 1 + math.ceil(max(self.max_labels - self.start_labels, 0) / self.step)


def recipe_conf(train: dict[str, Any]) -> dict[str, str]:
    """``--conf`` strings of ``TrainConfig`` settings (lists and dicts as compact JSON)."""
    conf = {}
    for key, value in train.items():
        if isinstance(value, list | tuple | dict):
            conf[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
        else:
            conf[key] = str(value)
    return {k: v.replace(" ", "") for k, v in conf.items()}


#: The quick quality profile's recipe (roi, batch sizes, network, learning rate), 100 epochs.
SESSION_RECIPE = recipe_conf(
    {
        **{
            k: v
            for k, v in PROFILES["quick"].train.items()
            if k in ("roi_size", "batch_size", "unlabeled_batch_size", "learning_rate", "network")
        },
        "iterations_per_epoch": PROFILES["quick"].train["iterations_per_epoch"],
        "epochs": 100,
        "val_interval": 0,
    }
)
#: ``--quick``: seconds of training on a CPU (cf. ``TINY_SERVER_CONF`` in tests/app_helpers.py).
QUICK_RECIPE = {
    "members": "2",
    "roi_size": "[16,16,16]",
    "epochs": "2",
    "iterations_per_epoch": "3",
    "batch_size": "1",
    "unlabeled_batch_size": "1",
    "learning_rate": "0.003",
    "network": '{"channels":[4,8],"strides":[2],"num_res_units":0}',
    "val_interval": "0",
}


def server_conf(settings: Settings, arm: Arm, seed: int) -> dict[str, str]:
    """The server's ``--conf``: one model, the recipe, the budgets, no validation split."""
    return {
        "models": arm.model,
        "labels": json.dumps(settings.labels, separators=(",", ":")),
        **settings.train,
        **settings.overrides,
        # Given, so that nothing is planned at start-up (the quality benchmark's defaults).
        "target_spacing": "none",
        "intensity": "zscore",
        "seed": str(seed),
        "num_workers": "0",
        "min_labels": str(min(settings.start_labels, 2)),
        "val_split": "0",
        "retrain_minutes": f"{settings.retrain_minutes:g}",
        "first_train_minutes": f"{settings.first_train_minutes:g}",
    }


# ------------------------------------------------------------------------------------ cases
def split_pool(
    cases: list[dict[str, str]], pool_cases: int, scoring_cases: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The studies pool and the scoring cases: a fixed split (:data:`SPLIT_SEED`) by name.

    Raises:
        ValueError: If there are not enough labeled cases.
    """
    labeled = sorted((c for c in cases if "label" in c), key=lambda c: c["name"])
    if len(labeled) < pool_cases + scoring_cases:
        raise ValueError(
            f"{len(labeled)} labeled cases, fewer than {pool_cases} + {scoring_cases} needed"
        )
    order = list(labeled)
    random.Random(SPLIT_SEED).shuffle(order)
    scoring = sorted(order[:scoring_cases], key=lambda c: c["name"])
    pool = sorted(order[scoring_cases : scoring_cases + pool_cases], key=lambda c: c["name"])
    return pool, scoring


def write_studies(pool: list[dict[str, str]], folder: Path, labeled: Iterable[str]) -> Path:
    """A studies folder of the pool's images, the ``labeled`` ones with their final label
    (as :func:`cotrain.studies.import_msd_studies` writes them)."""
    labeled = set(labeled)
    (folder / FINAL_LABELS_DIR).mkdir(parents=True, exist_ok=True)
    for case in pool:
        image = Path(case["image"])
        shutil.copyfile(image, folder / image.name)
        if case["name"] in labeled:
            shutil.copyfile(case["label"], folder / FINAL_LABELS_DIR / image.name)
    return folder


# ---------------------------------------------------------------------------------- the loop
def wait_for_model(
    client: Any, server: MonaiLabelServer, model: str, labels: int, timeout_s: float
) -> dict[str, Any]:
    """Wait until no training runs or waits and the train stats say ``DONE`` for a run that
    trained on at least ``labels`` labels; returns those stats.

    Raises:
        RuntimeError: If the run failed.
        TimeoutError: With the server's log tail.
    """

    def published() -> dict[str, Any] | None:
        if train_finished(client) is None:
            return None
        stats = client.info().get("train_stats", {}).get(model, {})
        if stats.get("status") == "FAILED":
            raise RuntimeError(f"{model}: training failed: {stats.get('error')}")
        trained_on = int(stats.get("labeled") or 0) + int(stats.get("validation") or 0)
        if stats.get("status") != "DONE" or not stats.get("published") or trained_on < labels:
            return None
        return stats

    try:
        return wait_for(published, timeout_s, f"a {model} model trained on {labels} labels", 1.0)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{server.log_tail()}") from None


def unlabeled_scored(client: Any, model: str, model_ts: int) -> bool:
    """Whether every unlabeled image's disagreement score comes from the model file whose
    modification time is ``model_ts`` (ns), or scoring found it cannot be segmented."""
    key = f"disagreement_{model}"
    for entry in client.datastore().get("objects", {}).values():
        if "final" in (entry.get("labels") or {}):
            continue
        score = (entry.get("image", {}).get("info") or {}).get(key) or {}
        if score.get("model_ts") != model_ts:
            return False
    return True


def next_case(client: Any, arm: Arm, rng: random.Random) -> dict[str, Any]:
    """The next case to annotate: the server's strategy, or a seeded client-side pick.

    Returns:
        The strategy's answer (``id`` plus what the strategy adds), or ``{}`` when every
        image is labeled.
    """
    if arm.strategy != CLIENT_RANDOM:
        return client.next_sample(arm.strategy, {}) or {}
    objects = client.datastore().get("objects", {})
    unlabeled = sorted(i for i, e in objects.items() if "final" not in (e.get("labels") or {}))
    return {"id": rng.choice(unlabeled)} if unlabeled else {}


def score_served_model(
    client: Any,
    model: str,
    cases: list[dict[str, str]],
    labels: dict[str, int],
) -> dict[str, Any]:
    """Auto-segment every scoring case through the server and score the soft vote.

    Each image is uploaded with the request (``file=``): MONAI Label's ``/infer`` endpoint
    writes it to a temporary file, infers and deletes it, so it never enters the datastore.

    Returns:
        ``mean_dice``, ``mean_hd95``, per class ``dice`` and ``hd95``, ``scoring_s`` (all the
        requests), ``infer_median_s`` and ``model_mtimes_ns`` (the served files' mtimes).
    """
    results, seconds, mtimes = [], [], set()
    for case in cases:
        start = time.monotonic()
        label_file, params = client.infer(model, "", {}, file=case["image"])
        seconds.append(time.monotonic() - start)
        mtimes.add(int(params["model"]["mtime_ns"]))
        reference, spacing, affine = load_reference(case["label"])
        predicted = nib.load(label_file)
        if predicted.shape != reference.shape or not np.allclose(predicted.affine, affine):
            raise RuntimeError(f"{case['name']}: the label is not on the image's grid")
        prediction = np.asarray(predicted.dataobj)
        results.append(dice_and_hd95(prediction, reference, labels, spacing))
        Path(label_file).unlink(missing_ok=True)
    summary = mean_over_cases(results, labels)
    return {
        "mean_dice": summary["mean_dice"],
        "mean_hd95": summary["mean_hd95"],
        "dice": summary["dice"],
        "hd95": summary["hd95"],
        "scoring_s": round(sum(seconds), 2),
        "infer_median_s": round(statistics.median(seconds), 3),
        "model_mtimes_ns": sorted(mtimes),
    }


@dataclass
class ArmRun:
    """What one arm and seed needs while it runs.

    Attributes:
        settings: The session's settings.
        arm: The arm.
        seed: The seed.
        pool: The studies pool's cases, by name.
        scoring: The scoring cases.
        work: This arm's work folder.
        emit: Called with each finished row.
        progress: Called once per finished cycle.
    """

    settings: Settings
    arm: Arm
    seed: int
    pool: dict[str, dict[str, str]]
    scoring: list[dict[str, str]]
    work: Path
    emit: Callable[[Row], None]
    progress: Callable[[], None]

    def run(self) -> Row:
        """Run the session; returns its ``end`` row (after emitting every cycle's row)."""
        s, arm = self.settings, self.arm
        rng = random.Random(self.seed)
        start_labels = sorted(rng.sample(sorted(self.pool), s.start_labels))
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        studies = write_studies(list(self.pool.values()), self.work / "studies", start_labels)
        app_dir = copy_app(self.work / "app")
        scratch = self.work / "client"
        scratch.mkdir()
        env = {} if arm.strategy in SCORED_STRATEGIES else dict(NO_SCORING_ENV)
        if s.threads:
            env["OMP_NUM_THREADS"] = str(s.threads)
        conf = server_conf(s, arm, self.seed)
        session_start = time.monotonic()
        server = MonaiLabelServer(app_dir, studies, conf, self.work / "server.log", env)
        with server:
            from monailabel.client import MONAILabelClient

            client = MONAILabelClient(
                server.url, tmpdir=str(scratch), client_id=f"session-{arm.spec}-{self.seed}"
            )
            assert server.process is not None
            with MemorySampler(server.process.pid) as memory:
                server_start_s = time.monotonic() - session_start
                labeled = list(start_labels)
                previous_mtime = 0
                cycle = 0
                # Cycle 0: the first training, started by the server itself at start-up.
                cycle_start = session_start
                submit_ns = time.time_ns() - int(server_start_s * 1e9)
                picks: list[dict[str, Any]] = [{"id": name} for name in start_labels]
                outcomes: list[str] = ["started at server start-up"]
                while True:
                    budget = s.first_train_minutes if cycle == 0 else s.retrain_minutes
                    runs = max(1, sum(o in ("started", "queued") for o in outcomes))
                    stats = wait_for_model(
                        client, server, arm.model, len(labeled), runs * budget * 60 + WAIT_SLACK_S
                    )
                    published_wait_s = time.monotonic() - cycle_start
                    scores_wait_s = 0.0
                    probed: list[int] = []
                    if arm.strategy in SCORED_STRATEGIES:
                        # The strategy must see the new model's scores: the served file's
                        # mtime (one request) is the scores' model_ts.
                        started = time.monotonic()
                        probe = score_served_model(client, arm.model, self.scoring[:1], s.labels)
                        probed = probe["model_mtimes_ns"]
                        wait_for(
                            lambda m=probed[0]: unlabeled_scored(client, arm.model, m),
                            WAIT_SLACK_S + len(self.pool),
                            "the disagreement scores of the new model",
                            1.0,
                        )
                        scores_wait_s = time.monotonic() - started
                    scores = score_served_model(client, arm.model, self.scoring, s.labels)
                    mtime = scores["model_mtimes_ns"][-1]
                    # Every request (the probe's too) answered by one model file.
                    served = sorted({*scores["model_mtimes_ns"], *probed})
                    peaks = memory.take()
                    row: Row = {
                        "kind": "cycle",
                        "name": s.name,
                        "arm": arm.spec,
                        "model": arm.model,
                        "strategy": arm.strategy,
                        "seed": self.seed,
                        "cycle": cycle,
                        "labels": len(labeled),
                        "chosen": [p["id"] for p in picks],
                        "strategy_answers": picks,
                        "train_outcomes": outcomes,
                        "retrain_minutes": s.retrain_minutes,
                        "budget_minutes": budget,
                        "last_submit_ns": submit_ns,
                        "previous_model_mtime_ns": previous_mtime,
                        "model_mtime_ns": mtime,
                        "fresh_model": served == [mtime]
                        and mtime != previous_mtime
                        and mtime > submit_ns,
                        "submit_to_published_s": round((mtime - submit_ns) / 1e9, 1),
                        "wait_published_s": round(published_wait_s, 1),
                        "scores_wait_s": round(scores_wait_s, 1),
                        **{k: v for k, v in scores.items() if k != "model_mtimes_ns"},
                        "served_mtimes_ns": served,
                        "server_peak_rss_mb": peaks.get("server"),
                        "train_peak_rss_mb": peaks.get("train"),
                        "scoring_peak_rss_mb": peaks.get("scoring"),
                        "planned_iterations": stats.get("planned_iterations"),
                        "warmup_iterations": stats.get("supervised_warmup_iterations"),
                        "trained_iterations": round(
                            float(stats.get("progress") or 0.0)
                            * int(stats.get("planned_iterations") or 0)
                        ),
                        "train_elapsed_s": stats.get("elapsed_s"),
                        "trained_on": int(stats.get("labeled") or 0)
                        + int(stats.get("validation") or 0),
                        "unlabeled": stats.get("unlabeled"),
                        "warm_start": stats.get("warm_start"),
                        "run_id": stats.get("run_id"),
                        "cycle_s": round(time.monotonic() - cycle_start, 1),
                        "server_start_s": round(server_start_s, 1) if cycle == 0 else None,
                    }
                    self.emit(row)
                    self.progress()
                    if not row["fresh_model"]:
                        raise RuntimeError(
                            f"{arm.spec} seed {self.seed} cycle {cycle}: the served model "
                            f"(mtimes {served}) is not newer than the last "
                            f"submit ({submit_ns}) or the previous model ({previous_mtime})"
                        )
                    previous_mtime = mtime
                    if len(labeled) >= s.max_labels:
                        break

                    # The next cycle: next sample -> submit, --step times.
                    cycle += 1
                    cycle_start = time.monotonic()
                    picks, outcomes = [], []
                    for _ in range(min(s.step, s.max_labels - len(labeled))):
                        answer = next_case(client, arm, rng)
                        image_id = answer.get("id")
                        if not image_id:
                            raise RuntimeError(f"{arm.strategy}: no unlabeled image left")
                        if image_id not in self.pool or image_id in labeled:
                            raise RuntimeError(f"{arm.strategy} proposed {image_id!r}")
                        submit_ns = time.time_ns()
                        response = client.save_label(image_id, self.pool[image_id]["label"])
                        outcome = (response.get("train") or {}).get(arm.model, "no answer")
                        logger.info("submitted %s: %s", image_id, outcome)
                        picks.append({k: answer[k] for k in ANSWER_KEYS if k in answer})
                        outcomes.append(outcome)
                        labeled.append(image_id)
                    if not any(o in ("started", "queued", "coalesced") for o in outcomes):
                        raise RuntimeError(f"the submits started no training: {outcomes}")

                images = set(client.datastore().get("objects", {}))
        leaked = images & {c["name"] for c in self.scoring}
        if leaked or images != set(self.pool):
            raise RuntimeError(
                f"the datastore holds {len(images)} images, not the {len(self.pool)} of the pool"
                + (f"; scoring cases entered it: {sorted(leaked)}" if leaked else "")
            )
        # Nothing lost: every label submitted (and every start label) is a final label on disk.
        stored = {p.name for p in (studies / FINAL_LABELS_DIR).iterdir()}
        missing = [i for i in labeled if Path(self.pool[i]["image"]).name not in stored]
        if missing:
            raise RuntimeError(f"submitted labels missing from the studies folder: {missing}")
        return {
            "kind": "end",
            "name": s.name,
            "labels_stored": len(labeled) - len(missing),
            "arm": arm.spec,
            "seed": self.seed,
            "cycles": cycle + 1,
            "labels": len(labeled),
            "session_s": round(time.monotonic() - session_start, 1),
            "datastore_images": len(images),
            "scoring_cases": [c["name"] for c in self.scoring],
            "studies": str(studies),
            "command": shlex.join([sys.executable, *sys.argv]),
        }


# ---------------------------------------------------------------------------------- the rows
def read_rows(path: Path) -> list[Row]:
    """The rows of a JSONL file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: Row) -> None:
    """Append one row to a JSONL file."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def drop_rows(path: Path, arm: str, seed: int) -> int:
    """Remove the rows of one arm and seed (an unfinished session); returns how many."""
    rows = read_rows(path)
    kept = [r for r in rows if (r["arm"], r["seed"]) != (arm, seed)]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)


def check_mergeable(name: str, row: Row, settings: Settings) -> None:
    """Raise ``ValueError`` if a cycle row of session ``name`` had another retrain budget or
    label count than this session's schedule gives its cycle."""
    run = f"--merge {name}: {row['arm']} seed {row['seed']}"
    if row["retrain_minutes"] != settings.retrain_minutes:
        raise ValueError(
            f"{run} retrained for {row['retrain_minutes']:g} min, this session for "
            f"{settings.retrain_minutes:g}"
        )
    expected = min(settings.start_labels + row["cycle"] * settings.step, settings.max_labels)
    if row["labels"] != expected:
        raise ValueError(
            f"{run} had {row['labels']} labels in cycle {row['cycle']}, this session's "
            f"schedule {expected}"
        )


def merged_rows(settings: Settings, own: list[Row]) -> list[Row]:
    """The rows of ``settings.merge``'s sessions that count beside ``own``: their finished runs
    of this session's arms and seeds that ``own`` has no rows of.

    Raises:
        ValueError: If a merged session is missing or ran another budget or label schedule.
    """
    arms = {arm.spec for arm in settings.arms}
    have = {(r["arm"], r["seed"]) for r in own}
    rows: list[Row] = []
    for name in settings.merge:
        path = settings.output / f"session-{name}.jsonl"
        theirs = read_rows(path)
        if not theirs:
            raise ValueError(f"--merge {name}: no rows in {path}")
        finished = {(r["arm"], r["seed"]) for r in theirs if r["kind"] == "end"}
        taken = {
            (arm, seed)
            for arm, seed in finished
            if arm in arms and seed in settings.seeds and (arm, seed) not in have
        }
        for row in theirs:
            if (row["arm"], row["seed"]) not in taken:
                continue
            if row["kind"] == "cycle":
                check_mergeable(name, row, settings)
            rows.append(row)
        have |= taken
    return rows


# -------------------------------------------------------------------------------- the report
CSV_COLUMNS = [
    "arm",
    "seed",
    "cycle",
    "labels",
    "chosen",
    "train_outcomes",
    "mean_dice",
    "mean_hd95",
    "model_mtime_ns",
    "fresh_model",
    "submit_to_published_s",
    "wait_published_s",
    "scores_wait_s",
    "scoring_s",
    "infer_median_s",
    "cycle_s",
    "server_peak_rss_mb",
    "train_peak_rss_mb",
    "scoring_peak_rss_mb",
    "planned_iterations",
    "trained_iterations",
    "retrain_minutes",
]


def write_csv(rows: list[Row], path: Path) -> None:
    """The cycle rows, one line each (lists joined by spaces)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if row["kind"] != "cycle":
                continue
            writer.writerow(
                {
                    k: " ".join(map(str, v)) if isinstance(v, list) else v
                    for k, v in row.items()
                    if k in CSV_COLUMNS
                }
            )


def by_arm(rows: list[Row]) -> dict[str, dict[int, list[Row]]]:
    """Cycle rows by arm (in first-seen order) and label count."""
    grouped: dict[str, dict[int, list[Row]]] = {}
    for row in rows:
        if row["kind"] == "cycle":
            grouped.setdefault(row["arm"], {}).setdefault(row["labels"], []).append(row)
    return grouped


def mean_of(rows: Iterable[Row], key: str) -> float | None:
    """Mean of a key over rows that have a value."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


#: The label-efficiency target: the candidate needs at most this share of the reference's labels.
EFFICIENCY_SHARE = 0.75


def efficiency_candidates(grouped: dict[str, dict[int, list[Row]]]) -> list[str]:
    """The arms judged against the reference: the issue's candidate (always, so a report
    without it says so), then every other co-trained arm present, in name order."""
    candidate, reference = EFFICIENCY_ARMS
    others = sorted(a for a in grouped if a != candidate and parse_arm(a).model != "supervised")
    return [candidate, *others]


def label_efficiency(
    grouped: dict[str, dict[int, list[Row]]], max_labels: int, candidate: str = EFFICIENCY_ARMS[0]
) -> str:
    """The label-efficiency target line: ``candidate`` reaches, with at most
    :data:`EFFICIENCY_SHARE` of the labels, the reference's Dice at ``max_labels``."""
    reference = EFFICIENCY_ARMS[1]
    if candidate not in grouped or reference not in grouped:
        return f"- Label efficiency: n/a (needs the arms {candidate} and {reference})."
    ref_rows = grouped[reference].get(max_labels)
    if not ref_rows:
        return f"- Label efficiency: n/a ({reference} has no result at {max_labels} labels yet)."
    target = mean_of(ref_rows, "mean_dice") or 0.0
    counts = sorted(grouped[candidate])
    allowed = max((n for n in counts if n <= EFFICIENCY_SHARE * max_labels), default=counts[0])
    at_allowed = mean_of(grouped[candidate].get(allowed, []), "mean_dice") or 0.0
    reached = [
        n
        for n, cycle_rows in sorted(grouped[candidate].items())
        if (mean_of(cycle_rows, "mean_dice") or 0.0) >= target
    ]
    head = (
        f"- Label efficiency ({candidate} at {allowed} labels, {100 * (1 - allowed / max_labels):.0f}% "
        f"fewer, reaching {reference}'s {100 * target:.2f} Dice at {max_labels}): "
        f"{100 * at_allowed:.2f} at {allowed}, "
    )
    if reached and reached[0] <= allowed:
        return head + f"first reached at **{reached[0]} labels**: met."
    first = f"first reached at {reached[0]} labels" if reached else "never reached"
    return head + f"{first}: **missed** by {100 * (target - at_allowed):.2f} Dice."


def seeds_of(grouped: dict[str, dict[int, list[Row]]]) -> dict[str, list[int]]:
    """The seeds each arm has rows of."""
    return {
        arm: sorted({r["seed"] for rows in per_count.values() for r in rows})
        for arm, per_count in grouped.items()
    }


def at_or_above(
    grouped: dict[str, dict[int, list[Row]]], from_labels: int, candidate: str = EFFICIENCY_ARMS[0]
) -> str:
    """The target line "``candidate`` is at or above the reference at every label count from
    ``from_labels`` on" (means over seeds; the worst margin, and per seed when there are more)."""
    reference = EFFICIENCY_ARMS[1]
    if candidate not in grouped or reference not in grouped:
        return f"- At or above from {from_labels} labels: n/a (needs {candidate} and {reference})."
    counts = sorted(n for n in grouped[candidate] if n >= from_labels and n in grouped[reference])
    if not counts:
        return f"- At or above from {from_labels} labels: n/a (no common label count yet)."

    def margins(seed: int | None) -> list[float]:
        def dice(arm: str, n: int) -> float | None:
            rows = [r for r in grouped[arm][n] if seed is None or r["seed"] == seed]
            return mean_of(rows, "mean_dice")

        pairs = [(dice(candidate, n), dice(reference, n)) for n in counts]
        return [100 * (c - r) for c, r in pairs if c is not None and r is not None]

    overall = margins(None)
    seeds = seeds_of(grouped)
    shared = sorted(set(seeds[candidate]) & set(seeds[reference]))
    per_seed = [(seed, min(m)) for seed in shared if (m := margins(seed))]
    return (
        f"- {candidate} at or above {reference} at every label count from {from_labels} on "
        f"({counts[0]}-{counts[-1]}, mean over seeds): margins {min(overall):+.2f} to "
        f"{max(overall):+.2f}: {'met' if min(overall) >= 0 else '**missed**'}"
        + (
            "; worst margin per seed: " + ", ".join(f"seed {s} {m:+.2f}" for s, m in per_seed)
            if len(per_seed) > 1
            else ""
        )
        + "."
    )


#: The soak target compares each process's peak memory from this cycle on with this cycle's.
SOAK_FROM_CYCLE = 5
#: Growth of a peak from :data:`SOAK_FROM_CYCLE` to the last cycle that counts as a leak.
SOAK_GROWTH = 0.10


def memory_growth(grouped: dict[str, dict[int, list[Row]]]) -> list[str]:
    """The soak lines (issue 18): per arm, the growth of the server's and the training's peak
    memory from cycle :data:`SOAK_FROM_CYCLE` to the last (needs more cycles than that)."""
    lines = []
    seeds = seeds_of(grouped)
    for arm, per_count in grouped.items():
        for seed in seeds[arm]:  # each seed is its own server
            rows = sorted(
                (r for rs in per_count.values() for r in rs if r["seed"] == seed),
                key=lambda r: r["cycle"],
            )
            start = [r for r in rows if r["cycle"] == SOAK_FROM_CYCLE]
            if not start or rows[-1]["cycle"] <= SOAK_FROM_CYCLE:
                continue
            parts, grew = [], False
            for key, what in (("server_peak_rss_mb", "server"), ("train_peak_rss_mb", "training")):
                first = float(start[0].get(key) or 0)
                last = max(float(r.get(key) or 0) for r in rows[-3:])
                growth = last / first - 1 if first else 0.0
                grew = grew or growth > SOAK_GROWTH
                parts.append(f"{what} {first:.0f} -> {last:.0f} MB ({100 * growth:+.1f}%)")
            lines.append(
                f"- Memory from cycle {SOAK_FROM_CYCLE} to {rows[-1]['cycle']} ({arm} seed "
                f"{seed}; the last 3 cycles' peak; < {100 * SOAK_GROWTH:.0f}% growth): "
                f"{', '.join(parts)}: {'**missed**' if grew else 'met'}"
            )
    return lines


def median_text(values: Iterable[Any]) -> str:
    """The median of the values that are not ``None`` (``-`` when none is)."""
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):g}" if present else "-"


def peak_text(rows: Iterable[Row], key: str) -> str:
    """The largest value of ``key`` over the rows, in whole units (``-`` when none has one)."""
    present = [r[key] for r in rows if r.get(key) is not None]
    return f"{max(present):.0f}" if present else "-"


def write_markdown(rows: list[Row], path: Path, settings: Settings) -> list[str]:
    """The session's tables and targets; returns the lines (also written to ``path``)."""
    grouped = by_arm(rows)
    seeds = seeds_of(grouped)
    ends = {(r["arm"], r["seed"]): r for r in rows if r["kind"] == "end"}
    counts = sorted({n for per_arm in grouped.values() for n in per_arm})
    s = settings
    lines = [
        f"# Annotation session `{s.name}`",
        "",
        f"Data `{s.data or 'synthetic (cotrain.synthetic)'}`: {s.pool_cases} cases in the "
        f"studies folder, {s.scoring_cases} others for scoring only; {s.start_labels} labels at start, +{s.step} per cycle to "
        f"{s.max_labels}; retrain budget {s.retrain_minutes:g} min (first training "
        f"{s.first_train_minutes:g} min). Scores: the served soft vote on the scoring cases, "
        "mean over seeds."
        + (
            " Recipe overrides: " + ", ".join(f"`{k} {v}`" for k, v in s.overrides.items()) + "."
            if s.overrides
            else ""
        ),
        "",
    ]
    merged = sorted(
        {
            (r["name"], r["arm"], r["seed"], r.get("command", ""))
            for r in ends.values()
            if r["name"] != s.name
        }
    )
    if merged:
        lines[-1:-1] = [
            "",
            "Runs counted from other sessions (`--merge`): "
            + "; ".join(
                f"`{arm}` seed {seed} from [`session-{name}`](session-{name}.md)"
                + (f" (`{command}`)" if command else "")
                for name, arm, seed, command in merged
            )
            + ".",
        ]
    warmups = {
        arm: sorted({r.get("warmup_iterations") for rs in per_count.values() for r in rs}, key=str)
        for arm, per_count in grouped.items()
    }
    shown = {arm: w for arm, w in warmups.items() if w and None not in w}
    if shown:  # the train stats' value: the recipe's, the server's device default or --conf
        lines[-1:-1] = [
            "",
            "Supervised warm-up (iterations, from the train stats): "
            + "; ".join(f"{arm} {', '.join(map(str, w))}" for arm, w in shown.items())
            + ".",
        ]
    for title, key, scale, digits in (
        ("Dice (%)", "mean_dice", 100.0, 2),
        ("HD95 (mm)", "mean_hd95", 1.0, 2),
    ):
        lines += [
            f"## {title}",
            "",
            "| arm | seeds | " + " | ".join(str(n) for n in counts) + " |",
            "|---|---|" + "---|" * len(counts),
        ]
        for arm, per_count in grouped.items():
            cells = []
            for n in counts:
                value = mean_of(per_count.get(n, []), key)
                cells.append("-" if value is None else f"{scale * value:.{digits}f}")
            lines.append(
                f"| {arm} | {','.join(map(str, seeds[arm]))} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    if any(len(arm_seeds) > 1 for arm_seeds in seeds.values()):
        lines += [
            "## Dice (%) per seed",
            "",
            "| arm | seed | " + " | ".join(str(n) for n in counts) + " |",
            "|---|---|" + "---|" * len(counts),
        ]
        for arm, per_count in grouped.items():
            for seed in seeds[arm]:
                cells = []
                for n in counts:
                    value = mean_of(
                        (r for r in per_count.get(n, []) if r["seed"] == seed), "mean_dice"
                    )
                    cells.append("-" if value is None else f"{100 * value:.2f}")
                lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += [
        "## Time and memory",
        "",
        "Per arm, over seeds and cycles: the session (server start to the last score), submit "
        "-> published (the model file's mtime after the cycle's last submit; retrains only), "
        "the trainings the submits caused per retrain cycle, scoring per cycle (every "
        "auto-segment request), the median request, peak RSS of the server process and of the "
        "training subprocess, the planned and trained iterations of a retrain (median).",
        "",
        "| arm | session (min) | submit -> published (s): median / max | trainings per cycle "
        "| scoring (s/cycle) | auto-segment (s/request) | server RSS (MB) | training RSS (MB) "
        "| planned / trained iterations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    retrain_limit = s.retrain_minutes * 60 + PUBLISH_TARGET_SLACK_S
    publish_lines = []
    for arm, per_count in grouped.items():
        arm_rows = [r for rs in per_count.values() for r in rs]
        retrains = [r for r in arm_rows if r["cycle"] > 0]
        sessions = [e["session_s"] / 60 for (a, _), e in sorted(ends.items()) if a == arm]
        publish = [r["submit_to_published_s"] for r in retrains]
        runs = [sum(o in ("started", "queued") for o in r["train_outcomes"]) for r in retrains]
        lines.append(
            f"| {arm} | {', '.join(f'{m:.1f}' for m in sessions) or 'unfinished'} "
            f"| {median_text(publish)} / {max(publish) if publish else '-'} "
            f"| {median_text(runs)} | {median_text([r['scoring_s'] for r in arm_rows])} "
            f"| {median_text([r['infer_median_s'] for r in arm_rows])} "
            f"| {peak_text(arm_rows, 'server_peak_rss_mb')} | {peak_text(arm_rows, 'train_peak_rss_mb')} "
            f"| {median_text([r['planned_iterations'] for r in retrains])} / "
            f"{median_text([r['trained_iterations'] for r in retrains])} |"
        )
        if publish:
            late = [p for p in publish if p > retrain_limit]
            verdict = "met" if not late else f"**missed** in {len(late)} of {len(publish)} cycles"
            publish_lines.append(
                f"  - {arm}: {verdict} (max {max(publish):g} s against {retrain_limit:g} s)"
            )
    lines += [
        "",
        "## Targets",
        "",
        *(
            line
            for arm in efficiency_candidates(grouped)
            for line in (
                label_efficiency(grouped, s.max_labels, arm),
                at_or_above(grouped, s.start_labels + s.step, arm),
            )
        ),
        *memory_growth(grouped),
        "- Labels stored at the end: "
        + (
            "; ".join(
                f"{arm} seed {seed}: {e.get('labels_stored', '?')} of {e['labels']}"
                for (arm, seed), e in sorted(ends.items())
            )
            or "no arm finished"
        )
        + ".",
        f"- Submit -> published within retrain_minutes + {PUBLISH_TARGET_SLACK_S:g} s "
        f"({retrain_limit:g} s):",
        *(publish_lines or ["  - n/a (no retrain cycle yet)"]),
        "- Session time per arm (min): "
        + (
            "; ".join(
                f"{arm} seed {seed}: {e['session_s'] / 60:.1f}"
                for (arm, seed), e in sorted(ends.items())
            )
            or "no arm finished"
        )
        + ".",
        "",
    ]
    path.write_text("\n".join(lines))
    return lines


def plot_session(rows: list[Row], path: Path, name: str) -> None:
    """Dice against labels (one line per arm, mean over seeds) and each cycle's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grouped = by_arm(rows)
    figure, (dice_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for arm, per_count in grouped.items():
        counts = sorted(per_count)
        dice = [100 * (mean_of(per_count[n], "mean_dice") or 0.0) for n in counts]
        dice_axis.plot(counts, dice, marker="o", label=arm)
        minutes = [(mean_of(per_count[n], "cycle_s") or 0.0) / 60 for n in counts]
        time_axis.plot(counts, minutes, marker="o", label=arm)
    dice_axis.set_xlabel("labels submitted")
    dice_axis.set_ylabel("soft-vote Dice on the scoring cases (%)")
    time_axis.set_xlabel("labels submitted")
    time_axis.set_ylabel("cycle time (min): submits, trainings, scoring")
    for axis in (dice_axis, time_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"cotrain annotation session ({name})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summarise(rows: list[Row], settings: Settings) -> list[str]:
    """Write the CSV, markdown and PNG of the rows; returns the markdown's lines."""
    out = settings.output
    write_csv(rows, out / f"session-{settings.name}.csv")
    lines = write_markdown(rows, out / f"session-{settings.name}.md", settings)
    if any(r["kind"] == "cycle" for r in rows):
        plot_session(rows, out / f"session-{settings.name}.png", settings.name)
    return lines


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """The command line's options (its help is this module's docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the tiny smoke-test sizes")
    parser.add_argument("--data", type=Path, help="an MSD folder (default: the hippocampus)")
    parser.add_argument("--arms", nargs="+", help="MODEL:STRATEGY ... (default: 4 arms)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--retrain-minutes", type=float, help="retrain budget (default 8)")
    parser.add_argument("--start-labels", type=int, help="labels at start (default 4)")
    parser.add_argument("--max-labels", type=int, help="labels at the end (default 16)")
    parser.add_argument("--step", type=int, help="labels submitted per cycle (default 2)")
    parser.add_argument("--pool-cases", type=int, help="cases in the studies folder (160)")
    parser.add_argument("--scoring-cases", type=int, help="cases for scoring only (40)")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of the server (default: unset; 1 quick)"
    )
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a server --conf setting over the recipe (e.g. supervised_warmup_iterations 300); "
        "give the run its own --name",
    )
    parser.add_argument("--name", help="results are OUTPUT/session-NAME.* (default: DATA-Rmin)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="NAME",
        help="count in the report the finished runs of this session's arms in "
        "OUTPUT/session-NAME.jsonl (e.g. seed 0 run earlier under another name)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--work", type=Path, help="keep the studies folders and server logs here (default: temp)"
    )
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The session's settings: the options given, else ``--quick``'s or the full defaults."""

    def pick(value: Any, quick: Any, full: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    retrain = float(pick(args.retrain_minutes, 0.2, 8.0))
    data = args.data or (None if args.quick else PROFILES["quick"].data)
    settings = Settings(
        name=args.name or (f"{data.name}-{retrain:g}min" if data else "quick"),
        data=data,
        arms=[parse_arm(a) for a in pick(args.arms, QUICK_ARMS, DEFAULT_ARMS)],
        seeds=list(args.seeds),
        labels=dict(HIPPOCAMPUS_LABELS) if data else {"organ": 1},
        retrain_minutes=retrain,
        start_labels=int(pick(args.start_labels, 2, 4)),
        max_labels=int(pick(args.max_labels, 4, 16)),
        step=int(pick(args.step, 1, 2)),
        pool_cases=int(pick(args.pool_cases, 6, 160)),
        scoring_cases=int(pick(args.scoring_cases, 2, 40)),
        train=dict(QUICK_RECIPE if args.quick else SESSION_RECIPE),
        overrides=dict(args.conf),
        threads=pick(args.threads, 1, None),
        output=args.output,
        work=args.work,
        quick=args.quick,
        merge=list(args.merge),
    )
    if settings.step < 1 or not 1 <= settings.start_labels <= settings.max_labels:
        raise ValueError("need step >= 1 and 1 <= start labels <= max labels")
    if settings.max_labels > settings.pool_cases:
        raise ValueError(f"max labels {settings.max_labels} > pool cases {settings.pool_cases}")
    if len(set(settings.arms)) != len(settings.arms):
        raise ValueError("an arm is given twice")
    return settings


def session_cases(
    settings: Settings, work: Path
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The pool and scoring cases: the MSD folder's, or ``--quick``'s synthetic ones."""
    data = settings.data
    if data is None:
        data = work / "synthetic"
        count = settings.pool_cases + settings.scoring_cases
        write_synthetic_msd(data, count, shape=(24, 24, 24), spacing=(1.0, 1.0, 1.5))
    return split_pool(list_msd_cases(data), settings.pool_cases, settings.scoring_cases)


def main(argv: list[str] | None = None) -> int:
    """Run the session's unfinished arms and seeds, then write the report."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = resolve_settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings.output.mkdir(parents=True, exist_ok=True)
    rows_path = settings.output / f"session-{settings.name}.jsonl"
    own = read_rows(rows_path)
    try:  # runs another session holds count as done (--merge)
        merged = merged_rows(settings, own)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finished = {(r["arm"], r["seed"]) for r in own + merged if r["kind"] == "end"}
    todo = [
        (arm, seed)
        for seed in settings.seeds
        for arm in settings.arms
        if (arm.spec, seed) not in finished
    ]
    temporary = None
    if settings.work is None:
        temporary = tempfile.TemporaryDirectory(
            prefix="cotrain-session-", ignore_cleanup_errors=True
        )
        work = Path(temporary.name)
    else:
        work = settings.work.resolve()  # the server runs in another folder
        work.mkdir(parents=True, exist_ok=True)
    try:
        pool, scoring = session_cases(settings, work)
        bar = tqdm(total=len(todo) * settings.cycles, desc="session cycles", unit="cycle")
        for arm, seed in todo:
            if drop_rows(rows_path, arm.spec, seed):
                logger.warning("%s seed %d was unfinished: restarting it", arm.spec, seed)
            bar.set_postfix_str(f"{arm.spec} seed {seed}")
            run = ArmRun(
                settings=settings,
                arm=arm,
                seed=seed,
                pool={c["name"]: c for c in pool},
                scoring=scoring,
                work=work / f"{arm.model}-{arm.strategy}-seed{seed}",
                emit=lambda row: append_row(rows_path, row),
                progress=lambda: bar.update(1),
            )
            append_row(rows_path, run.run())
        bar.close()
    finally:
        if temporary is not None:
            temporary.cleanup()
    lines = summarise(read_rows(rows_path) + merged, settings)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
