"""The speed benchmark (bench/speed.py) at its quick sizes, and the GPU check's syntax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cotrain.methods import METHOD_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SPEED = ROOT / "bench" / "speed.py"
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def run_speed(output: Path, *options: str) -> subprocess.CompletedProcess:
    """bench/speed.py at its quick sizes on the CPU, writing to ``output``: in its own process,
    as the command line runs it (bench/ on the path because the script is there), with one
    torch thread, as on the benchmark machine."""
    done = subprocess.run(
        [sys.executable, SPEED, "--quick", "--device", "cpu", "--output", output, *options],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        encoding="utf-8",  # the machine's locale may be ASCII (CI)
        errors="replace",
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_speed_benchmark_quick_writes_every_method_and_member_count(tmp_path: Path) -> None:
    done = run_speed(tmp_path, "--no-server")
    results = json.loads((tmp_path / "speed-cpu-quick.json").read_text())

    rows = {row["method"]: row for row in results["training"]}
    assert set(METHOD_CLASSES) <= set(rows)
    assert any(spec.startswith("dct_seg:") for spec in rows)  # the tuned recipes too
    assert any(spec.startswith("duo_segnet:") for spec in rows)
    for row in rows.values():
        assert row["seconds_per_step"] > 0 and row["data_seconds_per_step"] > 0
        assert row["ratio_to_supervised"] > 0
    assert rows["supervised"]["ratio_to_supervised"] == 1.0
    assert all(m["step_mb"] > 0 and m["total_mb"] > 0 for m in results["memory"])

    for volume in ("ct", "mr"):
        by_k = {row["k"]: row for row in results["inference"] if row["volume"] == volume}
        assert set(by_k) == {1, 2}
        for row in by_k.values():
            assert row["end_to_end_s"] >= row["network_s"] > 0
            assert row["preprocessing_s"] > 0 and row["scoring_s"] > 0
    assert results["server"] == {"skipped": "--no-server"}
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["device"] == "cpu"
    assert {t["target"].split(" ")[0] for t in results["targets"]} >= {"dct_seg", "duo_segnet"}

    table = (tmp_path / "speed-cpu-quick.md").read_text()
    assert "| supervised |" in table and "## Targets" in table
    assert "| x supervised |" in done.stdout  # the tables are printed


def test_gpu_check_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_speed_benchmark_projects_the_time_of_a_run_of_another_profile(tmp_path: Path) -> None:
    """``--profile full`` times the left-atrium profile's own methods at its recipe (a
    one-label task here: synthetic data with 2 classes) and projects each run's hours, so a
    user knows what the GPU profile costs before starting it."""
    run_speed(tmp_path, "--profile", "full")
    results = json.loads((tmp_path / "speed-cpu-full-quick.json").read_text())
    sys.path.insert(0, str(ROOT / "bench"))
    from profiles import PROFILES

    full = PROFILES["full"]
    expected = ["supervised"] + [m for m in full.methods if m not in ("supervised", "full")]
    assert [row["method"] for row in results["training"]] == expected
    assert "memory" not in results and "inference" not in results  # the training step only
    iterations = full.train["epochs"] * full.train["iterations_per_epoch"]
    assert results["settings"]["iterations_per_run"] == iterations
    table = (tmp_path / "speed-cpu-full-quick.md").read_text()
    for row in results["training"]:
        hours = (row["seconds_per_step"] + row["data_seconds_per_step"]) * iterations / 3600
        assert f"| {row['method']} | {hours:.1f} |" in table


def test_speed_benchmark_re_measures_one_part_into_its_own_file(tmp_path: Path) -> None:
    """``--parts inference`` times auto-segment and scoring alone and names its files after
    the part, so the committed full run's other tables stay as they were measured."""
    done = run_speed(tmp_path, "--parts", "inference")
    results = json.loads((tmp_path / "speed-cpu-inference-quick.json").read_text())
    assert not (tmp_path / "speed-cpu-quick.json").exists()

    assert "training" not in results and "memory" not in results
    assert {(row["volume"], row["k"]) for row in results["inference"]} >= {("ct", 2), ("mr", 1)}
    for row in results["inference"]:  # the parts are timed inside the call they are part of
        samples = row["samples"]
        for whole, pre, network in zip(
            samples["end_to_end"], samples["preprocessing"], samples["network"], strict=True
        ):
            assert pre > 0 and network > 0 and pre + network <= whole
        assert all(
            0 < part <= whole
            for part, whole in zip(samples["scoring_network"], samples["scoring"], strict=True)
        )
        assert row["end_to_end_over_network"] >= 1.0
    assert results["server"] == {"skipped": "--parts"}
    back = results["label_back"]  # the label back to the image grid, for both kinds of vote
    assert 0 < back["organ_voxel_fraction"] < 0.5
    for vote in ("random", "organs"):
        assert back[vote]["label_s"] > 0 and back[vote]["every_voxel_s"] > 0
    text = (tmp_path / "speed-cpu-inference-quick.md").read_text()
    assert "## Auto-segment and scoring" in text and "## Training step" not in text
    assert "an organ-like vote" in text
    assert "CT-sized, k=2: end to end" in done.stdout
