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

A method is a name from ``cotrain.methods.METHOD_CLASSES``, optionally with hyperparameters:
the method's own (``dct_seg:lambda_cot=2,lambda_div=0.2``) or ``TrainConfig`` settings
(``duo_segnet:perturb_unlabeled=true``); or ``full``: the supervised ensemble with every
training case labeled (an upper reference).

``--tune`` is for choosing hyperparameters: it holds out ``tuning_cases`` of the training
cases, trains on the rest and evaluates on them, never on the test split. Its results go to
``bench/results/PROFILE-tune.*``.

This file is the command line only: the profiles and method specs are in ``bench/profiles.py``,
the training and evaluation of the runs in ``bench/runner.py``, the statistics, table and plots
in ``bench/report.py``; ``bench/README.md`` documents the benchmark and its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from profiles import PROFILES, check_method_spec, split_cases
from report import describe_setting, summarise
from runner import append_row, done_runs, plan_runs, read_rows, run_plan
from tqdm import tqdm

logger = logging.getLogger("bench.quality")

#: Where the results go by default: ``bench/results``.
RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (its help is this module's docstring)."""
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
    parser.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="score the members on the evaluation cases every N iterations (a multiple of the "
        "iterations per epoch): the Dice-against-iterations curve of each run",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="train each run in a folder under this one and resume there: a long run stopped "
        "with its session continues from its last epoch in the next (e.g. bench/work)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs trained at the same time, each with its share of the CPU threads "
        "(2 on a 2-core machine nearly halves the wall time)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark's missing runs and write its rows, table, CSV and plots.

    Args:
        argv: The options (``sys.argv[1:]`` when ``None``).

    Returns:
        0, or 2 when the profile's data is missing (bad options exit with 2 too, before any
        run).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    profile = PROFILES[args.profile]
    per_epoch = profile.train["iterations_per_epoch"]
    if args.curve_every < 0 or args.curve_every % per_epoch:
        parser.error(f"--curve-every must be a multiple of {per_epoch}, got {args.curve_every}")
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
    overrides: dict[str, Any] = {}
    if args.label_counts:
        overrides["label_counts"] = args.label_counts
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.iterations:
        epochs = max(1, args.iterations // profile.train["iterations_per_epoch"])
        overrides["train"] = {**profile.train, "epochs": epochs}
    profile = dataclasses.replace(profile, **overrides)
    args.output.mkdir(parents=True, exist_ok=True)
    iterations = profile.train["epochs"] * profile.train["iterations_per_epoch"]
    # Results of a changed recipe go to their own files: PROFILE[-tune][-Nit].
    name = args.profile + ("-tune" if args.tune else "")
    if args.iterations:
        name += f"-{iterations}it"
    results_file = args.output / f"{name}.jsonl"
    rows = read_rows(results_file)

    splits = split_cases(profile, tune=args.tune)
    setting = describe_setting(iterations, len(splits[0]), args.tune)
    plan = plan_runs(profile, args.methods or profile.methods, len(splits[2]), done_runs(rows))
    runs = run_plan(profile, plan, splits, args.device, args.workers, args.curve_every, args.work)
    for row in tqdm(runs, total=len(plan), desc=f"benchmark {name}", unit="run"):
        tqdm.write(
            f"{row['method']} labeled={row['labeled']} seed={row['seed']}: vote Dice {row['vote_dice']:.4f}, members {row['member_dice']:.4f}, {row['seconds_per_iteration']} s/it"
        )
        append_row(results_file, row)
        rows = read_rows(results_file)  # with the rows of other runs writing to the same file
        summarise(rows, args.output, name, profile.targets, setting)
    if rows:
        summarise(rows, args.output, name, profile.targets, setting)
    return 0


if __name__ == "__main__":
    sys.exit(main())
