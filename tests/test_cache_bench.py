"""The cache benchmark (bench/cache.py) on tiny CTs: every source is measured and reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cache_benchmark_compares_the_three_sources(tmp_path: Path) -> None:
    command = [sys.executable, ROOT / "bench" / "cache.py", "--shapes", "24x24x16"]
    done = subprocess.run(
        [*command, "--studies", "2", "--output", str(tmp_path)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "cache-cpu.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 24x24x16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seconds = [float(c) for c in cells[3:6]]  # nifti, persistent, memory
    assert all(s > 0 for s in seconds)
    assert cells[-1].endswith("x") and cells[-2].endswith("x")
