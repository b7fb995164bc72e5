"""The quality benchmark's splits, method specifications, reports and command (bench/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cotrain.config import SERVED_RECIPE, TUNED_SETTINGS
from cotrain.synthetic import write_synthetic_msd

ROOT = Path(__file__).resolve().parents[1]
# bench/ is not a package: put it on the path, which the benchmark's spawned workers inherit.
sys.path.insert(0, str(ROOT / "bench"))
import profiles  # noqa: E402
import quality  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402


def test_tuning_never_touches_the_test_split(tmp_path: Path) -> None:
    write_synthetic_msd(tmp_path, 20, shape=(8, 8, 8))
    profile = profiles.Profile(
        data=tmp_path, num_test=5, label_counts=[2], labels={"organ": 1}, train={}, tuning_cases=4
    )
    test, _, train = profiles.split_cases(profile)
    tuning_test, _, tuning_train = profiles.split_cases(profile, tune=True)
    names = lambda cases: {c["name"] for c in cases}  # noqa: E731

    assert len(test) == 5 and len(train) == 15
    # Hyperparameters are chosen on cases held out of the training split, never on the test split.
    assert len(tuning_test) == 4 and names(tuning_test) <= names(train)
    assert not names(tuning_test) & names(test)
    assert not names(tuning_train) & (names(tuning_test) | names(test))
    assert names(tuning_train) | names(tuning_test) == names(train)


def test_the_plan_runs_every_seed_at_the_target_label_count_first() -> None:
    profile = profiles.Profile(
        data=Path("unused"),
        num_test=5,
        label_counts=[8, 15],
        labels={"organ": 1},
        train={},
        seeds=[0, 1, 2],
    )
    done = [("supervised", 8, 0)]
    plan = runner.plan_runs(profile, ["supervised", "dct_seg", "full"], 150, done)

    # A benchmark stopped part-way has the target rows (the fewest labels, every seed) first.
    counts = [count for _, count, _ in plan]
    assert counts[:5] == [8] * 5 and ("supervised", 8, 0) not in plan
    assert [seed for _, count, seed in plan if count == 8] == [0, 1, 1, 2, 2]
    # Full supervision runs once per seed, after the label counts it is compared with.
    assert [run for run in plan if run[0] == "full"] == [("full", 150, s) for s in (0, 1, 2)]
    assert plan.index(("full", 150, 0)) > plan.index(("dct_seg", 8, 2))


def test_method_spec_sets_method_and_run_settings() -> None:
    profile = profiles.PROFILES["quick"]
    name, params = profiles.parse_method("duo_segnet:perturb_unlabeled=true,lambda_u=1.0")
    config = profiles.train_config(profile, name, params, seed=3)

    assert config.method == "duo_segnet" and config.seed == 3
    assert config.perturb_unlabeled is True
    assert config.method_params == {"lambda_u": 1.0}
    assert config.roi_size == profile.train["roi_size"]
    plain = profiles.train_config(profile, *profiles.parse_method("duo_segnet"), seed=0)
    assert plain.perturb_unlabeled is False and plain.method_params == {}


def test_every_profile_method_is_a_valid_run() -> None:
    # A misspelled setting or hyperparameter would otherwise fail hours into a GPU run.
    for profile in profiles.PROFILES.values():
        for spec in profile.methods:
            profiles.check_method_spec(profile, spec)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("duo_segnet:lambda_uu=1.5", "lambda_uu"),
        ("dct_seg:perturb_unlabeled=yes", "'perturb_unlabeled=yes'"),
        ("supervised:perturb_unlabeled=true", "perturb_unlabeled"),
        ("co_teaching", "co_teaching"),
    ],
)
def test_a_bad_method_spec_fails_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, spec: str, named: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        quality.main(["--methods", "supervised", spec, "--output", str(tmp_path)])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert spec in message and named in message
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("method", sorted(TUNED_SETTINGS))
def test_the_benchmark_runs_the_recipe_the_app_serves(method: str) -> None:
    # The spec of the served recipe parses back to it, the profiles run it, and it names the
    # committed test-split rows that justify serving it.
    spec = profiles.served_spec(method)
    served = profiles.train_config(profiles.PROFILES["quick"], *profiles.parse_method(spec), seed=0)
    assert served.method == method
    assert served.perturb_unlabeled is TUNED_SETTINGS[method]["perturb_unlabeled"]
    assert served.method_params == TUNED_SETTINGS[method]["method_params"]
    assert served.augmentation == SERVED_RECIPE["augmentation"]
    assert served.min_ramp_iterations == SERVED_RECIPE["min_ramp_iterations"]
    assert all(spec in profile.methods for profile in profiles.PROFILES.values())
    committed = (ROOT / "bench" / "results" / "quick-1000it.jsonl").read_text().splitlines()
    measured = {json.loads(line)["method"] for line in committed}
    assert spec in measured
    assert profiles.STRONG_SUPERVISED in measured  # its baseline, with the same augmentation


def test_gain_over_supervised_compares_the_same_seeds(tmp_path: Path) -> None:
    # Supervised ran seeds 0-2, Duo-SegNet 0, 1 and 3: its gain and its target are measured
    # on seeds 0 and 1 against supervised seeds 0 and 1 (mean 0.79), not against all three
    # (mean 0.78), and seed 3, which has no supervised run, is left out of the comparison.
    def row(method: str, seed: int, vote: float) -> dict:
        return {
            "method": method,
            "labeled": 8,
            "seed": seed,
            "vote_dice": vote,
            "member_dice": vote,
            "vote_hd95": 2.0,
            "train_seconds": 1.0,
            "seconds_per_iteration": 0.1,
        }

    rows = [row("supervised", 0, 0.78), row("supervised", 1, 0.80), row("supervised", 2, 0.76)]
    rows += [row("duo_segnet", 0, 0.80), row("duo_segnet", 1, 0.82), row("duo_segnet", 3, 0.70)]
    report.summarise(rows, tmp_path, "paired", targets={8: (None, 1.5)})
    table = (tmp_path / "paired.md").read_text()

    duo_line = next(line for line in table.splitlines() if line.startswith("| duo_segnet"))
    assert "| +2.00 |" in duo_line
    assert "soft vote 81.00 against a target of 80.50" in table and ": met" in table
    assert "supervised vote + 1.5; 2 seeds)" in table


def _tiny_profile(tmp_path: Path, **fields) -> profiles.Profile:
    """A benchmark profile of 2-iteration epochs on 10 synthetic 16^3 cases (3 for testing)."""
    data = tmp_path / "msd"
    write_synthetic_msd(data, 10, shape=(16, 16, 16))
    train = {
        "roi_size": (16, 16, 16),
        "epochs": 2,
        "iterations_per_epoch": 2,
        "batch_size": 1,
        "unlabeled_batch_size": 1,
        "network": {"channels": [4, 8], "strides": [2]},
        "val_interval": 0,
    }
    return profiles.Profile(
        data=data, num_test=3, label_counts=[2], labels={"organ": 1}, train=train, **fields
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_benchmark_command_writes_results_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # The command a user runs, on a small synthetic MSD set, one run at a time or two in
    # parallel processes: rows, table, CSV, Dice plot and learning curves are written; a second
    # run with the same plan trains nothing again.
    output = tmp_path / "results"
    tiny = _tiny_profile(
        tmp_path,
        methods=["supervised", "duo_segnet"],
        targets={2: (None, 1.5)},
    )
    monkeypatch.setitem(profiles.PROFILES, "tiny", tiny)
    argv = ["--profile", "tiny", "--output", str(output), "--device", "cpu"]
    argv += ["--workers", str(workers)]

    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in (output / "tiny.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["method"], reverse=True)  # parallel runs end in any order
    assert [(r["method"], r["labeled"], r["seed"]) for r in rows] == [
        ("supervised", 2, 0),
        ("duo_segnet", 2, 0),
    ]
    for row in rows:
        assert 0.0 <= row["vote_dice"] <= 1.0
        # One learning-curve point per epoch, at the iteration the epoch ended.
        assert [point["iteration"] for point in row["loss_history"]] == [2, 4]
    assert "agreement" in rows[1]["loss_history"][-1]
    table = (output / "tiny.md").read_text()
    assert "| duo_segnet | 2 |" in table and "Targets:" in table
    for name in ("tiny.csv", "tiny.png", "tiny-curves.png"):
        assert (output / name).stat().st_size > 0

    assert quality.main(argv) == 0
    assert len((output / "tiny.jsonl").read_text().splitlines()) == 2


def test_the_tables_count_rows_another_benchmark_process_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two benchmark commands writing to the same results file (one per core): the tables
    # written after each run hold every row in the file, not only the writer's own.
    output = tmp_path / "results"
    tiny = _tiny_profile(tmp_path, seeds=[0, 1])
    monkeypatch.setitem(profiles.PROFILES, "tiny", tiny)
    argv = ["--profile", "tiny", "--output", str(output), "--device", "cpu"]
    assert quality.main([*argv, "--methods", "supervised", "--seeds", "0"]) == 0
    results = output / "tiny.jsonl"
    other = {**json.loads(results.read_text()), "seed": 1}

    real_run_plan = quality.run_plan

    def run_plan_beside_another(*args, **kwargs):
        for row in real_run_plan(*args, **kwargs):
            runner.append_row(results, other)  # the other process ends a run meanwhile
            yield row

    monkeypatch.setattr(quality, "run_plan", run_plan_beside_another)
    assert quality.main([*argv, "--methods", "jsd", "--seeds", "0"]) == 0
    csv_rows = (output / "tiny.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == 3 == len(results.read_text().splitlines())


def test_gains_compare_against_supervised_with_the_same_recipe(tmp_path: Path) -> None:
    # A method trained with strong augmentation is compared with supervised training with
    # strong augmentation, not with the weaker flip-only baseline.
    def row(method: str, vote: float) -> dict:
        return {
            "method": method,
            "labeled": 8,
            "seed": 0,
            "vote_dice": vote,
            "member_dice": vote,
            "vote_hd95": 2.0,
            "train_seconds": 1.0,
            "seconds_per_iteration": 0.1,
        }

    strong = 'augmentation="strong"'
    rows = [row("supervised", 0.80), row(f"supervised:{strong}", 0.84)]
    rows += [row(f"dct_seg:perturb_unlabeled=true,{strong}", 0.85), row("dct_seg", 0.82)]
    assert report.baseline_spec(f"dct_seg:perturb_unlabeled=true,{strong}") == (
        f"supervised:{strong}"
    )
    report.write_table(rows, tmp_path / "t.md", "t")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert "| +1.00 |" in next(x for x in lines if x.startswith("| dct_seg:perturb"))
    assert "| +2.00 |" in next(x for x in lines if x.startswith("| dct_seg |"))


def test_a_resumed_run_scores_the_curve_point_its_checkpoint_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine checkpoints an epoch before the curve point is scored: a run stopped in
    # between scores that point when it resumes, once.
    from types import SimpleNamespace

    scored = []

    def validate(*args: object) -> dict:
        scored.append(1)
        return {"vote_dice": 0.5, "member_dice": [0.5], "disagreement": 0.0}

    monkeypatch.setattr(runner, "validate_ensemble", validate)
    trainer = SimpleNamespace(ensemble=None, config=None, device=None, use_amp=False)
    record = runner.RunRecord(trainer, [], curve_every=4, path=None)
    record.points = [{"iteration": 4, "vote_dice": 0.4}]
    resumed = SimpleNamespace(epoch=8, iterations_per_epoch=1, total_epochs=12)
    record.on_train_start(resumed)
    assert [p["iteration"] for p in record.points] == [4, 8]
    record.on_train_start(resumed)  # already scored: not again
    assert len(scored) == 1
    record.on_train_start(SimpleNamespace(epoch=6, iterations_per_epoch=1, total_epochs=12))
    assert len(scored) == 1  # 6 is not a curve point


def test_a_run_folder_holding_another_runs_progress_is_not_resumed(tmp_path: Path) -> None:
    """A stopped tuning-split run and a test-split run of the same spec share a folder name:
    the test run must not resume the tuning run's checkpoint (or a 1000-iteration one a
    4000-iteration run)."""
    folder = runner.run_folder(tmp_path, "dct_seg:lambda_mix=1.0", 8, 0)
    tuning = {"config": {"epochs": 20}, "labeled": ["a.nii.gz"], "test": ["t1.nii.gz"]}
    runner.claim_run_folder(folder, tuning)
    (folder / "checkpoint.pt").write_bytes(b"tuning progress")
    # The same run again (a resumed session): its progress is kept.
    runner.claim_run_folder(folder, json.loads(json.dumps(tuning)))
    assert (folder / "checkpoint.pt").exists()
    # Another split's run of the same spec: it starts afresh, and claims the folder.
    testing = {**tuning, "test": ["t2.nii.gz"]}
    runner.claim_run_folder(folder, testing)
    assert not (folder / "checkpoint.pt").exists()
    assert json.loads((folder / runner.RUN_IDENTITY_FILE).read_text())["test"] == ["t2.nii.gz"]
    # A folder from before the identity file existed is resumed as it is.
    legacy = runner.run_folder(tmp_path, "supervised", 8, 0)
    legacy.mkdir()
    (legacy / "checkpoint.pt").write_bytes(b"old progress")
    runner.claim_run_folder(legacy, testing)
    assert (legacy / "checkpoint.pt").exists()
