"""Which cache for the unlabeled studies: measured per draw, side by side, on CT-sized studies.

A training step draws unlabeled volumes (``unlabeled_batch_size`` per member stream) and crops
them. Where a drawn volume comes from decides what a step costs beyond the network, and how
memory grows with the folder:

- ``nifti``: read and preprocess the file at each draw (nothing cached; no memory bound needed);
- ``persistent``: MONAI's ``PersistentDataset``, the preprocessed volume pickled to disk once
  and read back at each draw (disk grows with the folder, memory does not);
- ``memory``: the preprocessed volume held in memory (what ``cotrain`` does for the subset that
  fits ``cache_gb``), copied at each draw as ``RandomPatches`` does.

It prints the seconds per draw of each (median over the studies, page cache warm), the ratio to
``memory``, and writes ``bench/results/cache-cpu.md``. Command (about two minutes)::

    python bench/cache.py   # synthetic CTs of 192x192x128 and 512x512x160 at 0.8x0.8x2.5 mm
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import PersistentDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cotrain.config import TrainConfig  # noqa: E402
from cotrain.data import cached_bytes, preprocessing  # noqa: E402
from cotrain.synthetic import write_synthetic_ct  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def seconds(call, repeats: int = 3) -> float:
    """Median wall time of ``call()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape: tuple[int, ...], studies: int, work: Path) -> dict[str, float]:
    """Seconds per draw from each source (median over ``studies`` CTs of ``shape``), with
    the preprocessed volume's and the pickle's size in MB."""
    config = TrainConfig(
        labels={"liver": 1, "kidney": 2, "spine": 3},
        target_spacing=(1.5, 1.5, 2.0),
        intensity="ct:-1000,1000",
    )
    transform = preprocessing(config, keys=("image",))
    items = []
    for i in range(studies):
        image = work / f"ct_{i}.nii.gz"
        write_synthetic_ct(image, work / f"ct_{i}_label.nii.gz", shape, (0.8, 0.8, 2.5), i)
        items.append({"image": str(image)})
    persistent = PersistentDataset(items, transform, cache_dir=work / "persistent")
    cached = [transform(dict(item)) for item in items]
    for i in range(len(items)):
        persistent[i]  # written once, as a training's first draw would
    draws = {
        "nifti": [seconds(lambda it=it: transform(dict(it))) for it in items],
        "persistent": [seconds(lambda i=i: persistent[i]) for i in range(len(items))],
        "memory": [seconds(lambda v=v: copy.deepcopy(v)) for v in cached],
    }
    disk = sum(p.stat().st_size for p in (work / "persistent").iterdir()) / studies
    return {
        **{name: statistics.median(values) for name, values in draws.items()},
        "volume_mb": cached_bytes(cached[0]) / 2**20,
        "disk_mb": disk / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["192x192x128", "512x512x160"])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = " ".join(["python bench/cache.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Where the unlabeled volumes come from: seconds per draw",
        "",
        f"{args.studies} synthetic int16 CTs per shape at 0.8x0.8x2.5 mm, resampled to 1.5x1.5x2 "
        "mm for the model; one thread, page cache warm; median over the studies of the median "
        f"of 3. Command: `{command}`.",
        "",
        "| CT shape | preprocessed MB | pickle MB | nifti s | persistent s | memory s "
        "| nifti / memory | persistent / memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        with tempfile.TemporaryDirectory() as work:
            r = measure(shape, args.studies, Path(work))
        lines.append(
            f"| {text} | {r['volume_mb']:.0f} | {r['disk_mb']:.0f} | {r['nifti']:.4f} "
            f"| {r['persistent']:.4f} | {r['memory']:.4f} | {r['nifti'] / r['memory']:.0f}x "
            f"| {r['persistent'] / r['memory']:.1f}x |"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cache-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
