"""The annotation session's report (bench/session.py): seeds run under several names, one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import session  # noqa: E402

SERVED, REFERENCE = session.EFFICIENCY_ARMS


def cycle_row(name: str, arm: str, seed: int, cycle: int, dice: float, minutes: float = 8.0):
    """A cycle row as ``ArmRun`` writes it (the keys the report reads)."""
    return {
        "kind": "cycle",
        "name": name,
        "arm": arm,
        "seed": seed,
        "cycle": cycle,
        "labels": 4 + 2 * cycle,
        "retrain_minutes": minutes,
        "mean_dice": dice,
        "mean_hd95": 2.0,
        "submit_to_published_s": 400.0 if cycle else None,
        "train_outcomes": ["started"],
        "scoring_s": 6.0,
        "infer_median_s": 0.15,
        "cycle_s": 480.0,
        "server_peak_rss_mb": 600.0,
        "train_peak_rss_mb": 1300.0,
        "planned_iterations": 400,
        "trained_iterations": 400,
        "warmup_iterations": 300,
    }


def write_session(output: Path, name: str, runs: dict, finished: bool = True, **kw) -> None:
    """``session-NAME.jsonl`` with two cycles (4 and 6 labels) per (arm, seed) in ``runs``."""
    rows = []
    for (arm, seed), dice in runs.items():
        rows += [cycle_row(name, arm, seed, c, d, **kw) for c, d in enumerate(dice)]
        if finished:
            command = f"bench/session.py --name {name} --arms {arm} --seeds {seed}"
            rows.append(
                {
                    **{"kind": "end", "name": name, "arm": arm, "seed": seed, "cycles": 2},
                    **{"labels": 6, "labels_stored": 6, "session_s": 1200.0, "command": command},
                }
            )
    path = output / f"session-{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def settings(output: Path, seeds: list[int], merge: list[str]) -> session.Settings:
    return session.Settings(
        name="pair",
        data=None,
        arms=[session.parse_arm(SERVED), session.parse_arm(REFERENCE)],
        seeds=seeds,
        labels={"organ": 1},
        retrain_minutes=8.0,
        start_labels=4,
        max_labels=6,
        step=2,
        pool_cases=10,
        scoring_cases=2,
        output=output,
        merge=merge,
    )


def test_a_seed_run_under_another_name_counts_in_the_mean_and_the_targets(tmp_path: Path) -> None:
    # Seed 1 of the pair ran under this name; seed 0 of each arm ran earlier in two others.
    write_session(tmp_path, "pair", {(SERVED, 1): [0.80, 0.84], (REFERENCE, 1): [0.81, 0.83]})
    write_session(
        tmp_path, "old-served", {(SERVED, 0): [0.78, 0.80], ("dct_seg:random", 0): [0.5, 0.5]}
    )
    write_session(tmp_path, "old-reference", {(REFERENCE, 0): [0.79, 0.81]})
    write_session(tmp_path, "unfinished", {(SERVED, 2): [0.1, 0.1]}, finished=False)
    s = settings(tmp_path, [0, 1, 2], ["old-served", "old-reference", "unfinished"])

    own = session.read_rows(tmp_path / "session-pair.jsonl")
    merged = session.merged_rows(s, own)
    # Only the finished runs of this session's arms: not another arm, not an unfinished seed.
    assert {(r["arm"], r["seed"]) for r in merged} == {(SERVED, 0), (REFERENCE, 0)}

    lines = session.summarise(own + merged, s)
    table = "\n".join(lines)
    dice = table.split("## Dice (%)\n")[1].split("## HD95")[0].splitlines()
    assert f"| {SERVED} | 0,1 | 79.00 | 82.00 |" in dice  # the mean of seeds 0 and 1
    assert f"| {REFERENCE} | 0,1 | 80.00 | 82.00 |" in dice
    per_seed = table.split("## Dice (%) per seed")[1]
    assert f"| {SERVED} | 0 | 78.00 | 80.00 |" in per_seed
    assert f"| {SERVED} | 1 | 80.00 | 84.00 |" in per_seed
    assert "`session-old-served`" in table and "--name old-served" in table
    # At 6 labels the mean is level (82.00 each): met, but seed 0 alone is 1 point behind.
    above = next(line for line in lines if "at every label count from 6" in line)
    assert "met" in above and "seed 0 -1.00" in above and "seed 1 +1.00" in above
    # 75% of 6 labels is 4: the served arm's 79.00 there is 3 below the reference's 82.00.
    efficiency = next(line for line in lines if line.startswith("- Label efficiency"))
    assert "79.00 at 4" in efficiency and "**missed** by 3.00" in efficiency
    assert (tmp_path / "session-pair.md").read_text() == table
    # The rows file stays this session's own: a re-run does not count the merged rows twice.
    assert session.read_rows(tmp_path / "session-pair.jsonl") == own
    # A seed the session was not asked for is not taken.
    assert not session.merged_rows(settings(tmp_path, [1], ["old-served"]), own)


def test_the_command_runs_no_seed_another_session_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_session(tmp_path, "pair", {(SERVED, 1): [0.80, 0.84], (REFERENCE, 1): [0.81, 0.83]})
    write_session(tmp_path, "old", {(SERVED, 0): [0.78, 0.80], (REFERENCE, 0): [0.79, 0.81]})

    def no_run(**kwargs: object) -> None:
        raise AssertionError(f"ran {kwargs['arm']} seed {kwargs['seed']}")

    monkeypatch.setattr(session, "ArmRun", no_run)
    sizes = "--retrain-minutes 8 --start-labels 4 --max-labels 6 --step 2 --pool-cases 10"
    argv = [
        *("--quick", *sizes.split(), "--scoring-cases", "2", "--name", "pair"),
        *("--arms", SERVED, REFERENCE, "--seeds", "0", "1", "--merge", "old"),
        *("--output", str(tmp_path), "--work", str(tmp_path / "work")),
    ]
    assert session.main(argv) == 0  # every run is done: it only writes the report
    assert f"| {SERVED} | 0,1 | 79.00 | 82.00 |" in (tmp_path / "session-pair.md").read_text()
    # A merged session that does not exist is an error naming it, before anything runs.
    assert session.main([*argv[:-4], "--merge", "gone", *argv[-4:]]) == 2


def test_a_session_with_another_budget_is_not_merged(tmp_path: Path) -> None:
    write_session(tmp_path, "pair", {(SERVED, 1): [0.80, 0.84]})
    write_session(tmp_path, "short", {(REFERENCE, 0): [0.79, 0.81]}, minutes=1.5)
    s = settings(tmp_path, [0, 1], ["short"])
    with pytest.raises(ValueError, match="short.*1.5 min.*8"):
        session.merged_rows(s, session.read_rows(tmp_path / "session-pair.jsonl"))
    with pytest.raises(ValueError, match="no rows"):
        session.merged_rows(settings(tmp_path, [1], ["missing"]), [])


def test_memory_growth_is_judged_per_seed_server() -> None:
    # Seed 1's training grows by 20% over the last cycles; seed 0's stays flat.
    rows = []
    for seed in (0, 1):
        for cycle in range(7):
            row = cycle_row("pair", SERVED, seed, cycle, 0.8)
            if seed == 1 and cycle == 6:
                row["train_peak_rss_mb"] = 1560.0
            rows.append(row)
    lines = session.memory_growth(session.by_arm(rows))
    assert len(lines) == 2
    assert "seed 0" in lines[0] and lines[0].endswith("met")
    assert "seed 1" in lines[1] and "1300 -> 1560 MB (+20.0%)" in lines[1]
    assert lines[1].endswith("**missed**")


def test_every_co_trained_arm_is_judged_against_the_reference() -> None:
    # A session of the reference and dct_seg with another strategy: the candidate is
    # absent (said so), the other co-trained arm gets both target lines, supervised none.
    rows = [
        cycle_row("pair", arm, 0, cycle, dice)
        for arm, curve in {
            REFERENCE: [0.80, 0.82],
            "dct_seg:expected_error": [0.83, 0.84],
            "supervised:expected_error": [0.70, 0.71],
        }.items()
        for cycle, dice in enumerate(curve)
    ]
    grouped = session.by_arm(rows)
    assert session.efficiency_candidates(grouped) == [SERVED, "dct_seg:expected_error"]
    assert "n/a" in session.label_efficiency(grouped, 6, SERVED)
    # 75% of 6 labels is 4: 83.00 at 4 labels reaches the reference's 82.00 at 6.
    efficiency = session.label_efficiency(grouped, 6, "dct_seg:expected_error")
    assert "dct_seg:expected_error at 4 labels" in efficiency and efficiency.endswith("met.")
    above = session.at_or_above(grouped, 6, "dct_seg:expected_error")
    assert "margins +2.00 to +2.00: met" in above
