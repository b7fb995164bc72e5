"""Scale benchmark: memory and time of the real server as its studies folder grows.

For each folder size N it writes N CT-like studies (``cotrain.synthetic.write_synthetic_ct``:
int16 Hounsfield units, a body, a liver, a kidney and a spine whose pose and size vary per
study), the first few with their final label, starts the real ``monailabel`` server on them
(``dct_seg``, the same cache and time budgets for every N) and, through ``MONAILabelClient``
only, records per cycle:

- the first training (the server starts it by itself: the folder holds ``min_labels`` labels),
  then ``--cycles`` retrains, each after one more label submitted for the study next-sample
  proposes;
- submit -> published seconds, the train stats' time and planned iterations;
- peak resident memory of the server, the training and the scoring processes (``psutil``);
- the scoring run after each publish: its seconds, how many studies it scored and left for
  later (``/info``'s ``models.dct_seg.scoring.last_run``), how many unlabeled studies are
  scored with the served model, and whether a study uploaded before the retrain has a score
  at the end of the cycle;
- ``/datastore`` and next-sample latency (median of 5), and server start-up seconds.

The targets of issue 18 are checked at the end: peak training memory growing < 25% from the
smallest to the largest N, and staying under ``cache_gb`` plus the model's working set (the
training's peak with the smallest folder minus what it cached); each scoring run within its
budget (plus the model's loading); next-sample < 1 s at the largest N.

Rows go to ``bench/results/scale-NAME.jsonl`` as each N finishes (a finished N is skipped when
the command is run again), then ``.md``, ``.csv`` and ``.png``. Documented command (about an
hour on a 2-core CPU machine)::

    python bench/scale.py                # N = 50, 150, 300 of 192x192x128
    python bench/scale.py --quick        # seconds-sized smoke test (tests/test_scale_bench.py)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server_memory import MemorySampler
from session import QUICK_RECIPE, read_rows, wait_for_model
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cotrain.studies import FINAL_LABELS_DIR  # noqa: E402
from cotrain.synthetic import CT_ORGANS, write_synthetic_ct  # noqa: E402
from tests.app_helpers import MonaiLabelServer, copy_app, wait_for  # noqa: E402

logger = logging.getLogger("bench.scale")

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "dct_seg"
LABELS = {name: value for value, (name, *_) in CT_ORGANS.items()}
#: Seconds allowed over the budgets while waiting (server start, imports, case checks).
WAIT_SLACK_S = 900.0
Row = dict[str, Any]
#: The benchmark's client id: one annotator, so no study proposed to it is reserved against it.
CLIENT_ID = "scale-benchmark"


@dataclass
class Settings:
    """One scale run's settings.

    Attributes:
        name: Results are ``OUTPUT/scale-NAME.*``.
        sizes: Folder sizes N, smallest first.
        shape: Shape of every study.
        spacing: Voxel size (mm) of every study.
        start_labels: Final labels in the folder at start (the first training's).
        cycles: Retrains after the first training, one submitted label each.
        cache_gb: ``--conf cache_gb`` (the same for every N).
        first_train_minutes: ``--conf first_train_minutes``.
        retrain_minutes: ``--conf retrain_minutes``.
        score_minutes: ``--conf score_minutes``.
        train: Extra ``--conf`` of the model (``--quick``: a tiny network).
        threads: ``OMP_NUM_THREADS`` of the server and its subprocesses.
        output: Folder of the results.
        work: Folder of the generated studies and the servers' logs.
    """

    name: str
    sizes: list[int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    start_labels: int
    cycles: int
    cache_gb: float
    first_train_minutes: float
    retrain_minutes: float
    score_minutes: float
    train: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    output: Path = RESULTS
    work: Path | None = None

    def server_conf(self) -> dict[str, str]:
        """``--conf`` of the server: the budgets; roi, spacing and intensity are planned."""
        return {
            "models": MODEL,
            "labels": json.dumps(LABELS, separators=(",", ":")),
            "cache_gb": f"{self.cache_gb:g}",
            "first_train_minutes": f"{self.first_train_minutes:g}",
            "retrain_minutes": f"{self.retrain_minutes:g}",
            "score_minutes": f"{self.score_minutes:g}",
            "min_labels": str(self.start_labels),
            "epochs": "1000",  # the time budgets end every run
            "val_split": "0",
            "num_workers": "0",
            **self.train,
        }


# ------------------------------------------------------------------------------------ studies
def study_pool(folder: Path, count: int, settings: Settings) -> list[str]:
    """``count`` generated studies in ``folder`` (``images/``, ``labels/``), written once and
    reused by every N and every later run; returns their file names."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    names = [f"ct_{i:04d}.nii.gz" for i in range(count)]
    missing = [n for n in names if not (folder / "labels" / n).exists()]
    for name in tqdm(missing, desc="writing studies", unit="study", disable=not missing):
        seed = int(name[3:7])
        image, label = folder / "images" / name, folder / "labels" / name
        write_synthetic_ct(image, label, settings.shape, settings.spacing, seed=seed, jitter=0.06)
    return names


def studies_folder(pool: Path, names: list[str], folder: Path, labeled: int) -> Path:
    """A studies folder of ``names`` (hard links into the pool), the first ``labeled`` with
    their final label."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / FINAL_LABELS_DIR).mkdir(parents=True)
    for i, name in enumerate(names):
        os.link(pool / "images" / name, folder / name)
        if i < labeled:
            shutil.copyfile(pool / "labels" / name, folder / FINAL_LABELS_DIR / name)
    return folder


# --------------------------------------------------------------------------------- measuring
def median_ms(call: Any, repeats: int = 5) -> float:
    """Median wall time of ``call()`` in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def scoring_info(client: Any) -> dict[str, Any]:
    """``/info``'s scoring counts of the model."""
    return client.info()["models"][MODEL].get("scoring", {})


def wait_for_scoring(
    client: Any, memory: MemorySampler, model_ts: int, timeout_s: float
) -> dict[str, Any]:
    """Wait until the scoring run after the publish of ``model_ts`` has ended (``/info``'s
    ``last_run`` names that model and no scoring process is alive); returns ``/info``'s
    scoring entry."""

    def ended() -> dict[str, Any] | None:
        if memory.running("scoring"):
            return None
        status = scoring_info(client)
        return status if (status.get("last_run") or {}).get("model_ts") == model_ts else None

    return wait_for(ended, timeout_s, "the scoring run after the publish", 1.0)


def latencies(client: Any) -> dict[str, float]:
    """``/datastore`` and next-sample (``disagreement``) latency, ms."""
    return {
        "datastore_ms": median_ms(client.datastore),
        "next_sample_ms": median_ms(lambda: client.next_sample("disagreement", {})),
    }


def run_size(n: int, names: list[str], pool: Path, work: Path, settings: Settings) -> list[Row]:
    """Start a server on ``n`` studies, run the first training and the retrains; one row per
    cycle."""
    s = settings
    folder = studies_folder(pool, names[:n], work / f"studies-{n}", s.start_labels)
    shutil.rmtree(work / f"app-{n}", ignore_errors=True)  # no model from an earlier run
    app = copy_app(work / f"app-{n}")
    env = {"OMP_NUM_THREADS": str(s.threads), "MONAI_LABEL_TRACKING_ENABLED": "false"}
    rows: list[Row] = []
    server = MonaiLabelServer(app, folder, s.server_conf(), work / f"server-{n}.log", env)
    start = time.monotonic()
    with server:
        from monailabel.client import MONAILabelClient

        startup_s = round(time.monotonic() - start, 1)
        client = MONAILabelClient(server.url, tmpdir=str(work / "client"), client_id=CLIENT_ID)
        (work / "client").mkdir(exist_ok=True)
        assert server.process is not None
        with MemorySampler(server.process.pid) as memory:
            labeled, submit_ts = s.start_labels, time.monotonic()
            new_study: str | None = None
            for cycle in range(s.cycles + 1):
                budget = s.first_train_minutes if cycle == 0 else s.retrain_minutes
                timeout = 60 * (budget + s.score_minutes) + WAIT_SLACK_S
                stats = wait_for_model(client, server, MODEL, labeled, timeout)
                published_s = time.monotonic() - submit_ts
                train_memory = memory.take()
                model_ts = os.stat(app / "model" / f"{MODEL}.pt").st_mtime_ns
                status = wait_for_scoring(
                    client, memory, model_ts, 60 * s.score_minutes + WAIT_SLACK_S
                )
                scoring_memory = memory.take()
                objects = client.datastore().get("objects", {})
                row: Row = {
                    "n": n,
                    "cycle": cycle,
                    "labels": labeled,
                    "warm_start": bool(stats.get("warm_start")),
                    "submit_to_published_s": round(published_s, 1),
                    "train_s": stats.get("total_time"),
                    "planned_iterations": stats.get("planned_iterations"),
                    "unlabeled_studies": stats.get("unlabeled"),
                    "budget_minutes": budget,
                    "train_peak_rss_mb": train_memory.get("train"),
                    "server_peak_rss_mb": max(
                        train_memory.get("server", 0), scoring_memory.get("server", 0)
                    ),
                    "scoring_s": status["last_run"]["seconds"],
                    "scored_by_run": status["last_run"]["scored"],
                    "deferred_by_run": status["last_run"]["deferred"],
                    "scoring_peak_rss_mb": scoring_memory.get("scoring"),
                    "scored_with_current_model": status.get("scored_with_current_model"),
                    "never_scored": status.get("never_scored"),
                    "score_budget_minutes": status.get("budget_minutes"),
                    "startup_s": startup_s,
                    **latencies(client),
                }
                if new_study is not None:
                    info = (objects.get(new_study, {}).get("image", {}).get("info")) or {}
                    entry = info.get(f"disagreement_{MODEL}") or {}
                    row["new_study_scored"] = entry.get("score") is not None
                rows.append(row)
                logger.info("N %d cycle %d: %s", n, cycle, row)
                if cycle == s.cycles:
                    break
                # One more study arrives (never scored), and the radiologist submits the
                # label of the study next-sample proposes.
                new_study = f"new_{n}_{cycle}"
                spare = names[n + cycle]  # the pool has ``cycles`` studies more than N
                client.upload_image(str(pool / "images" / spare), new_study)
                proposed = client.next_sample("disagreement", {})["id"]
                source = proposed if proposed.startswith("ct_") else spare.removesuffix(".nii.gz")
                submit_ts = time.monotonic()
                client.save_label(proposed, str(pool / "labels" / f"{source}.nii.gz"))
                labeled += 1
    return rows


# ----------------------------------------------------------------------------------- results
def targets(rows: list[Row], settings: Settings) -> list[str]:
    """Issue 18's targets, met or missed, from the rows."""
    by_n = {n: [r for r in rows if r["n"] == n] for n in sorted({r["n"] for r in rows})}
    if len(by_n) < 2:
        return ["- fewer than two folder sizes measured: no growth target"]
    small, large = min(by_n), max(by_n)

    def peak(n: int, key: str) -> float:
        return max(float(r.get(key) or 0) for r in by_n[n])

    lines = []
    growth = peak(large, "train_peak_rss_mb") / max(peak(small, "train_peak_rss_mb"), 1e-9) - 1
    lines.append(
        f"- training peak RSS grows {100 * growth:+.1f}% from N = {small} to N = {large} "
        f"(< 25%): {'met' if growth < 0.25 else 'MISSED'}"
    )
    cache_mb = 1024 * settings.cache_gb
    bound = cache_mb + peak(small, "train_peak_rss_mb")
    lines.append(
        f"- training peak RSS at N = {large}: {peak(large, 'train_peak_rss_mb'):.0f} MB, under "
        f"cache_gb ({cache_mb:.0f} MB) + the working set at N = {small} "
        f"({peak(small, 'train_peak_rss_mb'):.0f} MB): "
        f"{'met' if peak(large, 'train_peak_rss_mb') <= bound else 'MISSED'}"
    )
    # A run may pass its budget by at most one study (its first is always scored).
    budget_s = 60 * settings.score_minutes
    over = [
        r
        for r in rows
        if float(r["scoring_s"]) > budget_s + float(r["scoring_s"]) / max(r["scored_by_run"], 1)
    ]
    worst = max(float(r["scoring_s"]) for r in rows)
    lines.append(
        f"- scoring runs within {budget_s:.0f} s plus one study: {len(rows) - len(over)} of "
        f"{len(rows)} (longest {worst:.1f} s): {'met' if not over else 'MISSED'}"
    )
    new = [r["new_study_scored"] for r in rows if "new_study_scored" in r]
    lines.append(
        f"- a study uploaded before a retrain has a score at the end of the cycle: {sum(new)} of "
        f"{len(new)}: {'met' if new and all(new) else 'MISSED'}"
    )
    latency = max(float(r["next_sample_ms"]) for r in by_n[large])
    lines.append(
        f"- next-sample at N = {large}: {latency:.0f} ms (< 1000 ms): "
        f"{'met' if latency < 1000 else 'MISSED'}"
    )
    return lines


COLUMNS = [
    ("n", "N"),
    ("cycle", "cycle"),
    ("labels", "labels"),
    ("startup_s", "start-up s"),
    ("submit_to_published_s", "submit -> published s"),
    ("planned_iterations", "iterations"),
    ("train_peak_rss_mb", "train peak MB"),
    ("server_peak_rss_mb", "server peak MB"),
    ("scoring_s", "scoring run s"),
    ("scored_by_run", "scored by the run"),
    ("deferred_by_run", "left for later"),
    ("scoring_peak_rss_mb", "scoring peak MB"),
    ("scored_with_current_model", "scored with this model"),
    ("never_scored", "never scored"),
    ("new_study_scored", "new study scored"),
    ("datastore_ms", "/datastore ms"),
    ("next_sample_ms", "next-sample ms"),
]


def write_report(rows: list[Row], settings: Settings) -> list[str]:
    """Write the markdown, CSV and plot; returns the target lines."""
    base = settings.output / f"scale-{settings.name}"
    rows = sorted(rows, key=lambda r: (r["n"], r["cycle"]))
    with open(f"{base}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = targets(rows, settings)
    shape = "x".join(map(str, settings.shape))
    md = [
        f"# Scale benchmark: `{settings.name}`",
        "",
        f"Studies of {shape} int16 at {settings.spacing} mm (`cotrain.synthetic`); "
        f"{settings.start_labels} final labels at start, then {settings.cycles} retrains of one "
        f"submitted label each. Every N: `cache_gb` {settings.cache_gb:g}, "
        f"`first_train_minutes` {settings.first_train_minutes:g}, `retrain_minutes` "
        f"{settings.retrain_minutes:g}, `score_minutes` {settings.score_minutes:g}, "
        f"{settings.threads} thread(s). Cycle 0 is the first training, which the server starts "
        "by itself; its time includes the first check of every study.",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    md += ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    md += ["", "## Targets", "", *lines, ""]
    Path(f"{base}.md").write_text("\n".join(md))
    plot(rows, Path(f"{base}.png"))
    return lines


def plot(rows: list[Row], path: Path) -> None:
    """Peak memory and scoring/retrain time against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})

    def series(key: str) -> list[float]:
        return [max(float(r.get(key) or 0) for r in rows if r["n"] == n) for n in sizes]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("train_peak_rss_mb", "training"),
        ("server_peak_rss_mb", "server"),
        ("scoring_peak_rss_mb", "scoring"),
    ):
        left.plot(sizes, series(key), marker="o", label=label)
    left.set(xlabel="studies in the folder", ylabel="peak RSS (MB)", title="memory")
    left.legend()
    for key, label in (
        ("submit_to_published_s", "submit -> published"),
        ("scoring_s", "scoring run"),
    ):
        right.plot(sizes, series(key), marker="o", label=f"{label} (longest)")
    right.set(xlabel="studies in the folder", ylabel="seconds", title="time")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="folder sizes N (50 150 300)")
    parser.add_argument("--shape", type=int, nargs=3, help="study shape (192 192 128)")
    parser.add_argument("--cycles", type=int, help="retrains after the first training (2)")
    parser.add_argument("--cache-gb", type=float, help="cache_gb of every N (0.5)")
    parser.add_argument("--retrain-minutes", type=float, help="retrain_minutes (2)")
    parser.add_argument("--score-minutes", type=float, help="score_minutes (1)")
    parser.add_argument("--name", help="results name (default: from the sizes)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="keep studies and logs here (default: temp)")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The command line's settings, ``--quick`` filling in its own defaults."""

    def pick(value: Any, quick: Any, full: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    sizes = sorted(pick(args.sizes, [5, 9], [50, 150, 300]))
    retrain = float(pick(args.retrain_minutes, 0.1, 2.0))
    return Settings(
        name=args.name or ("quick" if args.quick else "-".join(map(str, sizes))),
        sizes=sizes,
        shape=tuple(pick(args.shape, (40, 40, 24), (192, 192, 128))),
        spacing=(0.8, 0.8, 2.5),
        start_labels=2,
        cycles=int(pick(args.cycles, 1, 2)),
        cache_gb=float(pick(args.cache_gb, 0.0005, 0.5)),
        first_train_minutes=2 * retrain,
        retrain_minutes=retrain,
        score_minutes=float(pick(args.score_minutes, 0.05, 1.0)),
        train=(
            {k: QUICK_RECIPE[k] for k in ("members", "network", "batch_size")}
            | {"roi_size": "[16,16,16]", "unlabeled_batch_size": "1"}
            if args.quick
            else {}
        ),
        output=args.output,
        work=args.work,
    )


def main(argv: list[str] | None = None) -> int:
    """Measure the sizes not yet in the results, then write the report."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = resolve_settings(args)
    settings.output.mkdir(parents=True, exist_ok=True)
    rows_path = settings.output / f"scale-{settings.name}.jsonl"
    done = {r["n"] for r in read_rows(rows_path) if r["cycle"] == settings.cycles}
    temporary = None
    if settings.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="cotrain-scale-", ignore_cleanup_errors=True)
        work = Path(temporary.name)
    else:
        work = settings.work.resolve()  # the server runs in another folder
    work.mkdir(parents=True, exist_ok=True)
    try:
        shape = "x".join(map(str, settings.shape))
        pool = work / f"pool-{shape}"
        names = study_pool(pool, max(settings.sizes) + settings.cycles, settings)
        for n in tqdm([n for n in settings.sizes if n not in done], desc="folder sizes"):
            kept = [r for r in read_rows(rows_path) if r["n"] != n]
            rows = run_size(n, names, pool, work, settings)
            rows_path.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))
    finally:
        if temporary is not None:
            temporary.cleanup()
    lines = write_report(read_rows(rows_path), settings)
    (settings.output / f"scale-{settings.name}.settings.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()})
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
