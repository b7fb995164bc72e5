"""Quality benchmark: Dice and HD95 against the number of labeled cases, for every method.

Every method trains on the same splits and seeds and is evaluated on a test split it never
trains or tunes on, per member (averaged) and for the soft vote. Results go to
``bench/results/PROFILE.{jsonl,csv,md,png}``. Runs already in the JSONL file are skipped, so an
interrupted benchmark continues where it stopped.

    python bench/quality.py --profile quick --workers 2   # hippocampus, 2 CPU cores, ~1 hour
    python bench/quality.py --profile full --device cuda  # left atrium, meant for a GPU

``--workers N`` trains N runs at the same time, each in its own process with its share of the
CPU threads; the quick profile's runs add up to about 2 hours on one core each, so two
workers on two cores take about one.

A method is a name from ``cotrain.config.METHODS``, optionally with hyperparameters: the
method's own (``dct_seg:lambda_cot=2,lambda_div=0.2``) or ``TrainConfig`` settings
(``duo_segnet:perturb_unlabeled=true``); or ``full``: the supervised ensemble with every
training case labeled (an upper reference).

``--tune`` is for choosing hyperparameters: it holds out ``tuning_cases`` of the training
cases, trains on the rest and evaluates on them, never on the test split. Its results go to
``bench/results/PROFILE-tune.*``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cotrain.config import TUNED_SETTINGS, TrainConfig
from cotrain.data import list_msd_cases
from cotrain.engine import MODEL_FILE, Trainer
from cotrain.ensemble import EnsemblePredictor
from cotrain.methods import METHOD_CLASSES
from cotrain.metrics import dice_and_hd95, load_reference, mean_over_cases

logger = logging.getLogger("bench.quality")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def method_spec(method: str, settings: dict[str, Any]) -> str:
    """The inverse of :func:`parse_method`: ``TrainConfig`` settings as a method spec, e.g.
    ``("dct_seg", {"perturb_unlabeled": True, "method_params": {"agreement_focus": 0.5}})`` ->
    ``"dct_seg:perturb_unlabeled=true,agreement_focus=0.5"``."""
    flat = {k: v for k, v in settings.items() if k != "method_params"}
    flat.update(settings.get("method_params", {}))
    return f"{method}:" + ",".join(f"{k}={json.dumps(v)}" for k, v in flat.items())


# The recipes chosen with --tune (bench/results/quick-tune-1000it.md), which the app serves.
TUNED_DCT_SEG = method_spec("dct_seg", TUNED_SETTINGS["dct_seg"])
TUNED_DUO_SEGNET = method_spec("duo_segnet", TUNED_SETTINGS["duo_segnet"])
#: Every method; the co-training papers both as published and as tuned.
DEFAULT_METHODS = [
    "supervised",
    "dct_seg",
    TUNED_DCT_SEG,
    "duo_segnet",
    TUNED_DUO_SEGNET,
    "jsd",
    "mean_teacher",
    "cps",
    "full",
]


@dataclass
class Profile:
    """A benchmark setting: data, splits, label counts and the training recipe."""

    data: Path
    num_test: int
    label_counts: list[int]
    labels: dict[str, int]
    train: dict[str, Any]
    seeds: list[int] = field(default_factory=lambda: [0])
    num_validation: int = 0
    #: Training cases held out for ``--tune`` (hyperparameter choice).
    tuning_cases: int = 20
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    #: Label count -> (least soft-vote Dice in %, or None; least gain over the supervised
    #: vote in Dice points) that DCT-Seg and Duo-SegNet must reach.
    targets: dict[int, tuple[float | None, float]] = field(default_factory=dict)


PROFILES = {
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
    # 80 left-atrium MRIs: 64 train / 16 test, 8 and 16 labeled as in the literature; GPU.
    "full": Profile(
        data=SHARED_DATA / "la2018",
        num_test=16,
        label_counts=[8, 16],
        labels={"left_atrium": 1},
        seeds=[0, 1],
        num_validation=6,
        train={
            "roi_size": (96, 96, 64),
            "epochs": 60,
            "iterations_per_epoch": 100,
            "batch_size": 2,
            "unlabeled_batch_size": 2,
            "learning_rate": 1e-3,
            "network": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2]},
            "val_interval": 5,
        },
        targets={8: (88.0, 3.0), 16: (90.0, 3.0)},
    ),
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dct_seg:lambda_cot=2,lambda_div=0.2"`` -> ``("dct_seg", {"lambda_cot": 2.0, ...})``."""
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
    """Build the run's configuration and hyperparameters without training, so that a misspelled
    method, setting or hyperparameter fails before any run and not hours into a benchmark.

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
    """The profile's recipe for one run; ``params`` that name ``TrainConfig`` settings
    override the recipe, the others are the method's hyperparameters."""
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {**profile.train, **{k: v for k, v in params.items() if k in config_fields}}
    method_params = {k: v for k, v in params.items() if k not in config_fields}
    return TrainConfig(
        method=method, labels=profile.labels, seed=seed, method_params=method_params, **settings
    )


def split_cases(profile: Profile, tune: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """Test, validation and training cases: a fixed shuffle (seed 2024) of the sorted cases.

    Args:
        profile: The benchmark setting.
        tune: Replace the test split by ``profile.tuning_cases`` held out of the training cases.
    """
    cases = [c for c in list_msd_cases(profile.data) if "label" in c]
    random.Random(2024).shuffle(cases)
    test = cases[: profile.num_test]
    validation = cases[profile.num_test : profile.num_test + profile.num_validation]
    train = cases[profile.num_test + profile.num_validation :]
    if tune:
        test, train = train[: profile.tuning_cases], train[profile.tuning_cases :]
    return test, validation, train


def run_one(
    profile: Profile,
    method_spec: str,
    num_labeled: int,
    seed: int,
    splits: tuple,
    device: str | None,
) -> dict[str, Any]:
    """Train one method on one split and evaluate it on the test cases."""
    test, validation, train = splits
    name, params = parse_method(method_spec)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if name == "full":
        labeled, unlabeled, method = train, [], "supervised"
    else:
        labeled = [train[i] for i in order[:num_labeled]]
        unlabeled = [{"image": train[i]["image"]} for i in order[num_labeled:]]
        method = name
    config = train_config(profile, method, params, seed)
    with tempfile.TemporaryDirectory() as output:
        start = time.monotonic()
        state = Trainer(
            config, labeled, unlabeled, output, validation=validation, device=device
        ).fit()
        train_seconds = time.monotonic() - start
        predictor = EnsemblePredictor.load(Path(output) / MODEL_FILE, device=device)
        vote, members = [], []
        for case in test:
            prediction = predictor.predict_file(case["image"], members=True)
            reference, spacing, _ = load_reference(case["label"])
            vote.append(dice_and_hd95(prediction.label, reference, profile.labels, spacing))
            members.append(
                [
                    dice_and_hd95(m, reference, profile.labels, spacing)
                    for m in prediction.member_labels
                ]
            )
    vote_summary = mean_over_cases(vote, profile.labels)
    member_summaries = [
        mean_over_cases([m[i] for m in members], profile.labels) for i in range(len(members[0]))
    ]
    return {
        "method": method_spec,
        "labeled": len(labeled),
        "seed": seed,
        "iterations": config.epochs * config.iterations_per_epoch,
        "vote_dice": vote_summary["mean_dice"],
        "vote_hd95": vote_summary["mean_hd95"],
        "member_dice": float(np.mean([m["mean_dice"] for m in member_summaries])),
        "vote_dice_per_class": vote_summary["dice"],
        "train_seconds": round(train_seconds, 1),
        "seconds_per_iteration": round(
            train_seconds / (config.epochs * config.iterations_per_epoch), 3
        ),
        "final_losses": state.losses,
        # Learning curves: each epoch's mean loss terms and weights, at the iteration it ended.
        "loss_history": [
            {
                "iteration": entry["epoch"] * config.iterations_per_epoch,
                **{k: round(v, 6) for k, v in entry["losses"].items()},
            }
            for entry in state.history
        ],
    }


def _share_threads(threads: int) -> None:
    """Worker initialiser: each run at the same time gets its share of the CPU threads."""
    torch.set_num_threads(threads)


def run_plan(
    profile: Profile,
    plan: list[tuple[str, int, int]],
    splits: tuple,
    device: str | None,
    workers: int = 1,
) -> Iterator[dict[str, Any]]:
    """Train the planned runs, ``workers`` at a time, and yield each result as its run ends.

    Args:
        profile: The benchmark setting.
        plan: ``(method spec, label count, seed)`` of each run.
        splits: Test, validation and training cases (:func:`split_cases`).
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when present).
        workers: Runs trained at the same time, each in its own process with
            ``cpu_count // workers`` threads (sharing the GPU when there is one).
    """
    if workers <= 1:
        for method, count, seed in plan:
            yield run_one(profile, method, count, seed, splits, device)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_share_threads,
        initargs=(max(1, (os.cpu_count() or 1) // workers),),
    )
    try:
        futures = [
            pool.submit(run_one, profile, method, count, seed, splits, device)
            for method, count, seed in plan
        ]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # A failed run (or Ctrl-C) stops the queued runs; the finished ones are already saved.
        pool.shutdown(wait=True, cancel_futures=True)


def paired_with_supervised(
    group: list[dict], supervised: dict[tuple[int, int], float]
) -> tuple[float, float, int] | None:
    """A method's mean soft-vote Dice and the supervised one's, over the seeds both ran.

    Seeds change the labeled cases and the initialisation, so a gain is only measured
    against supervised runs with the same seeds.

    Args:
        group: One method's runs at one label count.
        supervised: Supervised soft-vote Dice by ``(labeled, seed)``.

    Returns:
        ``(method vote, supervised vote, number of those seeds)``, or ``None`` when no seed
        has both.
    """
    paired = [
        (r["vote_dice"], supervised[(r["labeled"], r["seed"])])
        for r in group
        if (r["labeled"], r["seed"]) in supervised
    ]
    if not paired:
        return None
    votes, references = zip(*paired, strict=True)
    return float(np.mean(votes)), float(np.mean(references)), len(paired)


def target_lines(
    groups: dict[tuple[str, int], list[dict]],
    supervised: dict[tuple[int, int], float],
    targets: dict[int, tuple[float | None, float]],
) -> list[str]:
    """One markdown line per DCT-Seg/Duo-SegNet result that has a target: met, or missed by
    how many Dice points (against supervised runs with the same seeds)."""
    lines = []
    for (method, labeled), group in sorted(
        groups.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        if labeled not in targets or not method.startswith(("dct_seg", "duo_segnet")):
            continue
        paired = paired_with_supervised(group, supervised)
        if paired is None:
            continue
        vote, reference, seeds = 100 * paired[0], 100 * paired[1], paired[2]
        least_dice, least_gain = targets[labeled]
        needed = reference + least_gain
        if least_dice is not None:
            needed = max(needed, least_dice)
        verdict = "met" if vote >= needed else f"missed by {needed - vote:.2f}"
        lines.append(
            f"- `{method}`, {labeled} labeled: soft vote {vote:.2f} against a target of "
            f"{needed:.2f} (supervised vote + {least_gain:g}"
            + (f", at least {least_dice:g}" if least_dice is not None else "")
            + f"; {seeds} seed{'s' if seeds > 1 else ''}): {verdict}"
        )
    return lines


def summarise(
    rows: list[dict],
    output: Path,
    profile_name: str,
    targets: dict[int, tuple[float | None, float]] | None = None,
    setting: str = "",
) -> None:
    """Write the CSV, the markdown table (mean ± std over seeds), the targets and the plot.

    Args:
        rows: One result per run.
        output: Folder of the files.
        profile_name: Stem of the file names.
        targets: Label count -> (least Dice, least gain over supervised), see :class:`Profile`.
        setting: A line saying how the runs trained and where they were evaluated.
    """
    with (output / f"{profile_name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "method",
                "labeled",
                "seed",
                "vote_dice",
                "member_dice",
                "vote_hd95",
                "train_seconds",
                "seconds_per_iteration",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r["method"],
                    r["labeled"],
                    r["seed"],
                    r["vote_dice"],
                    r["member_dice"],
                    r["vote_hd95"],
                    r["train_seconds"],
                    r["seconds_per_iteration"],
                ]
            )

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["labeled"]), []).append(r)

    def stat(values: list[float | None], scale: float = 1.0) -> str:
        values = [v * scale for v in values if v is not None]
        if not values:
            return "-"
        return (
            f"{np.mean(values):.2f} ± {np.std(values):.2f}"
            if len(values) > 1
            else f"{values[0]:.2f}"
        )

    supervised = {
        (r["labeled"], r["seed"]): r["vote_dice"] for r in rows if r["method"] == "supervised"
    }
    lines = [
        f"# Quality benchmark: profile `{profile_name}`",
        "",
        *([setting, ""] if setting else []),
        "Dice in %, HD95 in mm; mean ± std over seeds where there are several. "
        "A gain over supervised compares the seeds both ran (same labeled cases and initialisation).",
        "",
        "| method | labeled | soft-vote Dice | member Dice | vote - supervised vote | soft-vote HD95 | s/iteration | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, labeled), g in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        paired = paired_with_supervised(g, supervised) if method != "supervised" else None
        delta = f"{100 * (paired[0] - paired[1]):+.2f}" if paired else "-"
        lines.append(
            f"| {method} | {labeled} | {stat([r['vote_dice'] for r in g], 100)} | {stat([r['member_dice'] for r in g], 100)} "
            f"| {delta} | {stat([r['vote_hd95'] for r in g])} | {stat([r['seconds_per_iteration'] for r in g])} | {len(g)} |"
        )
    checked = target_lines(groups, supervised, targets)
    if checked:
        lines += ["", "Targets:", "", *checked]
    lines += [
        "",
        "s/iteration is the wall time per training step on the machine that ran the benchmark,",
        "with whatever else ran there (see the notes): a record, not a speed measurement.",
    ]
    (output / f"{profile_name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in sorted({m for m, _ in groups}):
        counts = sorted(n for m, n in groups if m == method)
        means = [100 * np.mean([r["vote_dice"] for r in groups[(method, n)]]) for n in counts]
        stds = [100 * np.std([r["vote_dice"] for r in groups[(method, n)]]) for n in counts]
        if method == "full":
            axis.axhline(
                means[0],
                linestyle="--",
                color="black",
                label=f"full supervision ({counts[0]} labeled)",
            )
            continue
        axis.errorbar(counts, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_xlabel("labeled training cases")
    axis.set_ylabel("soft-vote Dice (%)")
    axis.set_title(f"cotrain quality benchmark ({profile_name})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output / f"{profile_name}.png", dpi=120)
    plt.close(figure)
    plot_learning_curves(rows, output / f"{profile_name}-curves.png", profile_name)


def plot_learning_curves(rows: list[dict], path: Path, profile_name: str) -> None:
    """Plot each method's training loss terms against iterations (mean over seeds).

    One panel per term: the supervised loss (the same Dice+CE for every method, so comparable
    across them) and each method's own agreement term (unweighted; its definition differs
    between methods, so compare its course within a method). Rows from before the curves were
    recorded have no ``loss_history`` and are left out; nothing is written when none has one.

    Args:
        rows: One result per run.
        path: The PNG to write.
        profile_name: Named in the title.
    """
    curves: dict[tuple[str, int], list[list[dict]]] = {}
    for r in rows:
        if r.get("loss_history"):
            curves.setdefault((r["method"], r["labeled"]), []).append(r["loss_history"])
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = {"supervised": "supervised loss (Dice+CE)", "agreement": "agreement term (unweighted)"}
    figure, axes = plt.subplots(1, len(terms), figsize=(12, 4.5))
    for axis, (term, title) in zip(axes, terms.items(), strict=True):
        for (method, labeled), histories in sorted(curves.items()):
            length = min(len(h) for h in histories)
            if term not in histories[0][0]:
                continue
            iterations = [histories[0][i]["iteration"] for i in range(length)]
            means = [np.mean([h[i][term] for h in histories]) for i in range(length)]
            axis.plot(
                iterations, means, label=f"{method} ({labeled} labeled, {len(histories)} seeds)"
            )
        axis.set_xlabel("iteration")
        axis.set_title(title)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"cotrain learning curves ({profile_name}), epoch means over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--methods", nargs="+", help="override the profile's methods")
    parser.add_argument(
        "--label-counts", type=int, nargs="+", help="override the profile's label counts"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument(
        "--iterations",
        type=int,
        help="override the total iterations (epochs x iterations per epoch)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="evaluate on cases held out of the training split, not on the test split",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs trained at the same time, each with its share of the CPU threads "
        "(2 on a 2-core machine nearly halves the wall time)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    profile = PROFILES[args.profile]
    for spec in args.methods or []:
        try:
            check_method_spec(profile, spec)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if not profile.data.is_dir():
        print(f"data not found: {profile.data}", file=sys.stderr)
        return 2
    if args.label_counts:
        profile.label_counts = args.label_counts
    if args.seeds:
        profile.seeds = args.seeds
    if args.iterations:
        profile.train = {
            **profile.train,
            "epochs": max(1, args.iterations // profile.train["iterations_per_epoch"]),
        }
    args.output.mkdir(parents=True, exist_ok=True)
    iterations = profile.train["epochs"] * profile.train["iterations_per_epoch"]
    # Results of a changed recipe go to their own files: PROFILE[-tune][-Nit].
    name = args.profile + ("-tune" if args.tune else "")
    if args.iterations:
        name += f"-{iterations}it"
    results_file = args.output / f"{name}.jsonl"
    rows = (
        [json.loads(line) for line in results_file.read_text().splitlines()]
        if results_file.exists()
        else []
    )
    done = {(r["method"], r["labeled"], r["seed"]) for r in rows}

    splits = split_cases(profile, tune=args.tune)
    setting = f"{iterations} training iterations; evaluated on " + (
        f"{len(splits[0])} cases held out of the training split for tuning (never the test split)."
        if args.tune
        else f"the test split ({len(splits[0])} cases, never trained or tuned on)."
    )
    # Fewest labels first: the targets are at the smallest label count.
    plan = [
        (method, len(splits[2]) if method == "full" else count, seed)
        for seed in profile.seeds
        for count in profile.label_counts
        for method in args.methods or profile.methods
        if method != "full" or count == profile.label_counts[-1]
    ]
    plan = [run for run in plan if run not in done]
    runs = run_plan(profile, plan, splits, args.device, args.workers)
    for row in tqdm(runs, total=len(plan), desc=f"benchmark {name}", unit="run"):
        tqdm.write(
            f"{row['method']} labeled={row['labeled']} seed={row['seed']}: vote Dice {row['vote_dice']:.4f}, members {row['member_dice']:.4f}, {row['seconds_per_iteration']} s/it"
        )
        with results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        summarise(rows, args.output, name, profile.targets, setting)
    if rows:
        summarise(rows, args.output, name, profile.targets, setting)
    return 0


if __name__ == "__main__":
    sys.exit(main())
