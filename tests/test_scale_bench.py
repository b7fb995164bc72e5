"""The scale benchmark (bench/scale.py) at its quick sizes, on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "bench" / "scale.py"


def test_quick_scale_run_records_memory_scoring_and_latency(tmp_path: Path) -> None:
    output, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MONAI_LABEL_TRACKING_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, SCALE, "--quick", "--output", output, "--work", work],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (output / "scale-quick.jsonl").read_text().splitlines()]
    sizes = sorted({r["n"] for r in rows})
    assert len(sizes) == 2
    for n in sizes:
        cycles = sorted((r for r in rows if r["n"] == n), key=lambda r: r["cycle"])
        assert [r["cycle"] for r in cycles] == [0, 1]
        assert [r["labels"] for r in cycles] == [2, 3]
        assert [r["warm_start"] for r in cycles] == [False, True]
        for row in cycles:
            assert row["train_peak_rss_mb"] > 0 and row["server_peak_rss_mb"] > 0
            assert row["submit_to_published_s"] > 0 and row["planned_iterations"] > 0
            # The scoring run after the publish recorded itself; its counts add up.
            assert row["scoring_s"] >= 0 and row["scored_by_run"] >= 1
            unlabeled = n - row["labels"] + row["cycle"]  # one study uploaded per retrain
            assert row["scored_with_current_model"] + row["never_scored"] <= unlabeled
            assert row["datastore_ms"] > 0 and row["next_sample_ms"] > 0
        # The study uploaded before the retrain has a score by the end of the cycle.
        assert cycles[1]["new_study_scored"] is True
    for suffix in ("md", "csv", "png"):
        assert (output / f"scale-quick.{suffix}").stat().st_size > 0
    assert "## Targets" in (output / "scale-quick.md").read_text()
    assert "next-sample at N" in done.stdout
