"""The annotation session benchmark (bench/session.py) at its quick sizes, on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cotrain.studies import FINAL_LABELS_DIR

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "bench" / "session.py"
ARMS = ("dct_seg:disagreement", "supervised:random")


def test_quick_session_serves_a_fresh_model_every_cycle(tmp_path: Path) -> None:
    output, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        # A recipe override reaches the server: DCT-Seg's first training starts supervised.
        [
            *(sys.executable, SESSION, "--quick", "--output", output, "--work", work),
            *("--conf", "supervised_warmup_iterations", "3"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",  # the machine's locale may be ASCII (CI)
        errors="replace",
        timeout=420,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (output / "session-quick.jsonl").read_text().splitlines()]
    cycles = [r for r in rows if r["kind"] == "cycle"]
    ends = {r["arm"]: r for r in rows if r["kind"] == "end"}
    assert set(ends) == set(ARMS)

    for arm in ARMS:
        arm_rows = sorted((r for r in cycles if r["arm"] == arm), key=lambda r: r["cycle"])
        # Both arms have a row for every cycle: the first model (2 labels) and 2 cycles of 1.
        assert [r["cycle"] for r in arm_rows] == [0, 1, 2]
        assert [r["labels"] for r in arm_rows] == [2, 3, 4]
        assert ends[arm]["cycles"] == 3 and ends[arm]["labels"] == 4

        previous = 0
        for row in arm_rows:
            # Each cycle was scored with one model, published after the cycle's last submit
            # and after the model the cycle before was scored with: never a stale one.
            assert row["fresh_model"] and row["served_mtimes_ns"] == [row["model_mtime_ns"]]
            assert row["previous_model_mtime_ns"] == previous
            assert row["model_mtime_ns"] > max(previous, row["last_submit_ns"])
            assert row["submit_to_published_s"] > 0
            assert row["trained_on"] == row["labels"]
            previous = row["model_mtime_ns"]
            assert 0.0 <= row["mean_dice"] <= 1.0
            assert all(0.0 <= d <= 1.0 for d in row["dice"].values())
            assert row["scoring_s"] > 0 and row["infer_median_s"] > 0
            assert row["server_peak_rss_mb"] > 0 and row["train_peak_rss_mb"] > 0
            assert row["planned_iterations"] > 0
        assert all(len(r["chosen"]) == 1 for r in arm_rows[1:])
        assert [r["warm_start"] for r in arm_rows] == [False, True, True]

        # Every label submitted (and the start labels) is a final label of the studies folder;
        # the scoring cases never entered it.
        studies = Path(ends[arm]["studies"])
        final = {p.name.removesuffix(".nii.gz") for p in (studies / FINAL_LABELS_DIR).iterdir()}
        chosen = [name for r in arm_rows for name in r["chosen"]]
        assert len(set(chosen)) == 4 and set(chosen) == final
        images = {p.name.removesuffix(".nii.gz") for p in studies.glob("*.nii.gz")}
        assert len(images) == ends[arm]["datastore_images"] == 6
        assert len(ends[arm]["scoring_cases"]) == 2
        assert not images & set(ends[arm]["scoring_cases"])

    for suffix in ("md", "csv", "png"):
        assert (output / f"session-quick.{suffix}").stat().st_size > 0
    table = (output / "session-quick.md").read_text()
    assert "| dct_seg:disagreement |" in table and "## Targets" in table
    assert "Recipe overrides: `supervised_warmup_iterations 3`" in table
    # The warm-up the server trained with, as its train stats say.
    assert "dct_seg:disagreement 3" in table.split("Supervised warm-up")[1].splitlines()[0]
    assert "Label efficiency" in done.stdout  # the table is printed
