"""What the quality benchmark reports: its statistics, its table and CSV, its plots.

From the rows of the runs (:mod:`runner`), :func:`summarise` writes ``NAME.csv`` (one line a
run), ``NAME.md`` (mean ± std over seeds per method and label count, the gain over
supervised runs with the same seeds, the targets met or missed), ``NAME.png`` (soft-vote Dice
against the label count) and ``NAME-curves.png`` (the training loss terms against iterations).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from profiles import method_spec, parse_method

logger = logging.getLogger("bench.report")

__all__ = [
    "describe_setting",
    "group_rows",
    "paired_with_supervised",
    "plot_dice",
    "plot_learning_curves",
    "summarise",
    "supervised_votes",
    "target_lines",
    "write_csv",
    "write_table",
]

Row: TypeAlias = dict[str, Any]
#: Label count -> (least soft-vote Dice in %, or None; least gain over the supervised vote in
#: Dice points), as in ``profiles.Profile.targets``.
Targets: TypeAlias = dict[int, tuple[float | None, float]]

#: The CSV's columns, one row field each.
CSV_COLUMNS = [
    "method",
    "labeled",
    "seed",
    "vote_dice",
    "member_dice",
    "vote_hd95",
    "train_seconds",
    "seconds_per_iteration",
]


def describe_setting(iterations: int, num_cases: int, tune: bool) -> str:
    """The line saying how the runs trained and where they were evaluated.

    Args:
        iterations: Training iterations of each run.
        num_cases: Cases the runs were evaluated on.
        tune: Whether those are held out of the training split (``--tune``).
    """
    return f"{iterations} training iterations; evaluated on " + (
        f"{num_cases} cases held out of the training split for tuning (never the test split)."
        if tune
        else f"the test split ({num_cases} cases, never trained or tuned on)."
    )


def group_rows(rows: list[Row]) -> dict[tuple[str, int], list[Row]]:
    """The rows of each ``(method spec, label count)``, in the order they came.

    Args:
        rows: One result per run.
    """
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["labeled"]), []).append(r)
    return groups


#: ``TrainConfig`` settings of a method spec that change how the labels are learnt, so that
#: its gain is measured against supervised training with the same ones (a spec's other
#: settings, e.g. ``perturb_unlabeled``, and its hyperparameters concern the unlabeled data).
RECIPE_SETTINGS = (
    "augmentation",
    "optimizer",
    "learning_rate",
    "batch_size",
    "members",
    "network",
    "roi_size",
)

#: Supervised soft-vote Dice by ``(supervised spec, labeled, seed)``.
SupervisedVotes: TypeAlias = dict[tuple[str, int, int], float]


def baseline_spec(method: str) -> str:
    """The supervised spec a method spec's gain is measured against: ``supervised`` with the
    spec's :data:`RECIPE_SETTINGS` (``'dct_seg:perturb_unlabeled=true,augmentation="strong"'``
    -> ``'supervised:augmentation="strong"'``)."""
    _, settings = parse_method(method)
    recipe = {k: v for k, v in settings.items() if k in RECIPE_SETTINGS}
    return method_spec("supervised", recipe) if recipe else "supervised"


def supervised_votes(rows: list[Row]) -> SupervisedVotes:
    """Supervised soft-vote Dice by ``(spec, labeled, seed)``, the references of the gains.

    Args:
        rows: One result per run.
    """
    return {
        (r["method"], r["labeled"], r["seed"]): r["vote_dice"]
        for r in rows
        if r["method"].partition(":")[0] == "supervised"
    }


def paired_with_supervised(
    group: list[Row], supervised: SupervisedVotes
) -> tuple[float, float, int] | None:
    """A method's mean soft-vote Dice and the supervised one's, over the seeds both ran.

    Seeds change the labeled cases and the initialisation, so a gain is only measured
    against supervised runs with the same seeds, and with the same recipe
    (:func:`baseline_spec`).

    Args:
        group: One method's runs at one label count.
        supervised: Supervised soft-vote Dice by ``(spec, labeled, seed)``.

    Returns:
        ``(method vote, supervised vote, number of those seeds)``, or ``None`` when no seed
        has both.
    """
    keys = [(baseline_spec(r["method"]), r["labeled"], r["seed"]) for r in group]
    paired = [
        (r["vote_dice"], supervised[key])
        for r, key in zip(group, keys, strict=True)
        if key in supervised and key[0] != r["method"]
    ]
    if not paired:
        return None
    votes, references = zip(*paired, strict=True)
    return float(np.mean(votes)), float(np.mean(references)), len(paired)


def target_lines(
    groups: dict[tuple[str, int], list[Row]],
    supervised: SupervisedVotes,
    targets: Targets | None,
) -> list[str]:
    """One markdown line per DCT-Seg/Duo-SegNet result that has a target.

    Each says whether the target is met, or missed by how many Dice points (against
    supervised runs with the same seeds).

    Args:
        groups: Rows by ``(method spec, label count)`` (:func:`group_rows`).
        supervised: Supervised soft-vote Dice by ``(spec, labeled, seed)``.
        targets: Label count -> (least Dice, least gain over supervised); none when ``None``.

    Returns:
        The lines, fewest labels first, then by method spec.
    """
    targets = targets or {}
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


def _mean_std(values: list[float | None], scale: float = 1.0) -> str:
    """``"mean ± std"`` of the defined values (the value alone if one, ``"-"`` if none)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return (
        f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
    )


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per run: its spec, label count, seed, Dice, HD95 and times.

    Args:
        rows: One result per run.
        path: The CSV to write.
    """
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r[column] for column in CSV_COLUMNS])


def write_table(
    rows: list[Row],
    path: Path,
    profile_name: str,
    targets: Targets | None = None,
    setting: str = "",
) -> None:
    """The markdown table: mean ± std over seeds per method and label count, and the targets.

    Args:
        rows: One result per run.
        path: The markdown file to write.
        profile_name: Named in the title.
        targets: Label count -> (least Dice, least gain over supervised).
        setting: A line saying how the runs trained and where they were evaluated.
    """
    groups = group_rows(rows)
    supervised = supervised_votes(rows)
    lines = [
        f"# Quality benchmark: profile `{profile_name}`",
        "",
        *([setting, ""] if setting else []),
        "Dice in %, HD95 in mm; mean ± std over seeds where there are several. "
        "A gain over supervised compares the seeds both ran (same labeled cases and initialisation) "
        "and the same recipe (augmentation, optimiser, ...: the supervised row with the method's "
        "recipe settings).",
        "",
        "| method | labeled | soft-vote Dice | member Dice | vote - supervised vote | soft-vote HD95 | s/iteration | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, labeled), g in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        paired = paired_with_supervised(g, supervised)
        delta = f"{100 * (paired[0] - paired[1]):+.2f}" if paired else "-"
        lines.append(
            f"| {method} | {labeled} | {_mean_std([r['vote_dice'] for r in g], 100)} | {_mean_std([r['member_dice'] for r in g], 100)} "
            f"| {delta} | {_mean_std([r['vote_hd95'] for r in g])} | {_mean_std([r['seconds_per_iteration'] for r in g])} | {len(g)} |"
        )
    checked = target_lines(groups, supervised, targets)
    if checked:
        lines += ["", "Targets:", "", *checked]
    lines += dice_curve_lines(rows)
    lines += [
        "",
        "s/iteration is the wall time per training step on the machine that ran the benchmark,",
        "with whatever else ran there (see the notes): a record, not a speed measurement.",
    ]
    path.write_text("\n".join(lines) + "\n")


def dice_curves(rows: list[Row]) -> dict[tuple[str, int], dict[int, list[float]]]:
    """Soft-vote Dice at each scored iteration, per method and label count, over seeds.

    Only rows that record a ``dice_curve`` (``--curve-every``) count.
    """
    curves: dict[tuple[str, int], dict[int, list[float]]] = {}
    for r in rows:
        for point in r.get("dice_curve", []):
            key = (r["method"], r["labeled"])
            curves.setdefault(key, {}).setdefault(point["iteration"], []).append(point["vote_dice"])
    return curves


def seconds_per_iteration(rows: list[Row]) -> dict[tuple[str, int], float]:
    """Mean recorded training seconds per iteration, per method and label count (rows that
    record a ``dice_curve`` only): converts a curve's iterations into training wall time."""
    times: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.get("dice_curve") and r.get("seconds_per_iteration"):
            times.setdefault((r["method"], r["labeled"]), []).append(r["seconds_per_iteration"])
    return {key: float(np.mean(values)) for key, values in times.items()}


def dice_curve_lines(rows: list[Row]) -> list[str]:
    """A markdown table of the soft vote's Dice against iterations (none without curves)."""
    curves = dice_curves(rows)
    if not curves:
        return []
    iterations = sorted({i for points in curves.values() for i in points})
    lines = [
        "",
        "Soft-vote Dice (%) of the members as they were at each iteration, on the same cases "
        "(mean over seeds; `--curve-every`):",
        "",
        "| method | labeled | " + " | ".join(str(i) for i in iterations) + " | best at |",
        "|---|---|" + "---|" * len(iterations) + "---|",
    ]
    for (method, labeled), points in sorted(
        curves.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        means = {i: 100 * float(np.mean(points[i])) for i in iterations if i in points}
        best = max(means, key=means.__getitem__)
        cells = [f"{means[i]:.2f}" if i in means else "-" for i in iterations]
        lines.append(f"| {method} | {labeled} | " + " | ".join(cells) + f" | {best} |")
    lines += equal_time_lines(curves, seconds_per_iteration(rows))
    return lines


def equal_time_lines(
    curves: dict[tuple[str, int], dict[int, list[float]]],
    per_iteration: dict[tuple[str, int], float],
) -> list[str]:
    """Each curve's Dice at the training wall time of its supervised run's whole length (the
    latest point within it; :func:`baseline_spec`): what the same minutes buy each method."""
    lines = []
    for (method, labeled), points in sorted(curves.items(), key=lambda i: (i[0][1], i[0][0])):
        reference = (baseline_spec(method), labeled)
        if reference[0] == method or reference not in curves or reference not in per_iteration:
            continue
        budget = per_iteration[reference] * max(curves[reference])
        step = per_iteration.get((method, labeled))
        within = [i for i in points if step and i * step <= budget]
        if not within:
            continue
        at = max(within)
        dice = 100 * float(np.mean(points[at]))
        supervised = 100 * float(np.mean(curves[reference][max(curves[reference])]))
        lines.append(
            f"- `{method}` ({labeled} labeled) in {budget / 60:.0f} training minutes: "
            f"{dice:.2f} at iteration {at}, against `{reference[0]}`'s {supervised:.2f} "
            f"({dice - supervised:+.2f})"
        )
    if lines:
        lines = [
            "",
            "At equal training time (each run's recorded seconds per iteration, on a machine "
            "shared with other runs; a point of a longer run, whose learning rate has not yet "
            "decayed, is a lower bound on a run of that length):",
            "",
            *lines,
        ]
    return lines


def plot_dice(rows: list[Row], path: Path, profile_name: str) -> None:
    """Plot each method's soft-vote Dice against the label count (mean ± std over seeds).

    ``full`` is a dashed line: full supervision, the upper reference.

    Args:
        rows: One result per run.
        path: The PNG to write.
        profile_name: Named in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
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
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_learning_curves(rows: list[Row], path: Path, profile_name: str) -> None:
    """Plot each method's training loss terms against iterations (mean over seeds).

    One panel per term, and with ``dice_curve`` rows a third one of the soft vote's Dice against
    iterations. The terms: the supervised loss (the same Dice+CE for every method, so comparable
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
        logger.debug("no row records learning curves: %s not written", path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = {"supervised": "supervised loss (Dice+CE)", "agreement": "agreement term (unweighted)"}
    dice = dice_curves(rows)
    per_iteration = seconds_per_iteration(rows)
    panels = len(terms) + 2 * bool(dice)
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    # The soft vote's Dice against iterations, then against training minutes.
    dice_panels = [
        ("iteration", "on the evaluation cases", lambda key: 1.0),
        (
            "training minutes (recorded s/iteration)",
            "against training time",
            lambda key: per_iteration.get(key, 0.0) / 60,
        ),
    ]
    for axis, (xlabel, title, scale) in zip(
        axes[len(terms) :], dice_panels if dice else [], strict=True
    ):
        for key, points in sorted(dice.items()):
            iterations = sorted(points)
            axis.plot(
                [i * scale(key) for i in iterations],
                [100 * np.mean(points[i]) for i in iterations],
                marker=".",
                label=f"{key[0]} ({key[1]} labeled)",
            )
        axis.set_xlabel(xlabel)
        axis.set_title(f"soft-vote Dice (%) {title}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis, (term, title) in zip(axes[: len(terms)], terms.items(), strict=True):
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


def summarise(
    rows: list[Row],
    output: Path,
    profile_name: str,
    targets: Targets | None = None,
    setting: str = "",
) -> None:
    """Write the CSV, the markdown table (mean ± std over seeds), the targets and the plots.

    Args:
        rows: One result per run.
        output: Folder of the files.
        profile_name: Stem of the file names.
        targets: Label count -> (least Dice, least gain over supervised), see
            ``profiles.Profile``.
        setting: A line saying how the runs trained and where they were evaluated.
    """
    write_csv(rows, output / f"{profile_name}.csv")
    write_table(rows, output / f"{profile_name}.md", profile_name, targets, setting)
    plot_dice(rows, output / f"{profile_name}.png", profile_name)
    plot_learning_curves(rows, output / f"{profile_name}-curves.png", profile_name)
