"""The radiologist's loop on real data, through the real server and client.

Imports an MSD folder as a studies folder with the first ``--labeled`` labels already submitted,
starts ``monailabel start_server`` with the cotrain app on 127.0.0.1, submits ``--submit`` more
labels through ``MONAILabelClient.save_label`` (which starts training by itself), waits for the
run, then auto-segments ``--evaluate`` unlabeled studies and scores them against their ground
truth (which training never read). Prints one JSON report.

    python bench/server_roundtrip.py --data ../shared/data/hippocampus --labeled 8 --submit 2 \
        --labels '{"anterior":1,"posterior":2}' --roi 40,56,40 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cotrain.data import list_msd_cases  # noqa: E402
from cotrain.metrics import dice_and_hd95, load_reference, mean_over_cases  # noqa: E402
from cotrain.studies import import_msd_studies  # noqa: E402
from tests.app_helpers import MonaiLabelServer, wait_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labeled", type=int, default=8, help="labels already submitted at start")
    parser.add_argument("--submit", type=int, default=2, help="labels submitted through the client")
    parser.add_argument(
        "--evaluate", type=int, default=20, help="unlabeled studies to auto-segment"
    )
    parser.add_argument("--model", default="dct_seg")
    parser.add_argument("--labels", default='{"foreground":1}')
    parser.add_argument("--roi", default="96,96,96")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="training processes (0: one per GPU; N > 1 on a CPU: N gloo processes)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    from monailabel.client import MONAILabelClient

    cases = {c["name"]: c for c in list_msd_cases(args.data)}
    labels = json.loads(args.labels)
    # ignore_cleanup_errors: a scoring subprocess may still write into the studies folder.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work:
        work = Path(work)
        studies = import_msd_studies(args.data, work / "studies", num_labeled=args.labeled)
        to_submit = studies.unlabeled[: args.submit]
        to_evaluate = studies.unlabeled[args.submit : args.submit + args.evaluate]
        conf = {
            "models": args.model,
            "labels": json.dumps(labels, separators=(",", ":")),
            "roi_size": f"[{args.roi}]",
            "epochs": str(args.epochs),
            "iterations_per_epoch": str(args.iterations),
            "min_labels": "2",
            "processes": str(args.processes),
        }
        with MonaiLabelServer(
            ROOT / "apps" / "cotrain", studies.folder, conf, work / "server.log"
        ) as server:
            # A private folder: the client names a result after the server's temporary file, and
            # on one machine the server's clean-up of /tmp would delete the client's copy.
            client = MONAILabelClient(server.url, tmpdir=str(work / "client"))
            submitted_at = time.monotonic()
            for name in to_submit:
                response = client.save_label(name, cases[name]["label"])
                print(f"submitted {name}: {response.get('train')}", file=sys.stderr)

            def finished() -> dict | None:
                if client.train_status(check_if_running=True):
                    return None
                task = client.train_status()
                return task if task.get("status") not in ("SUBMITTED", "RUNNING") else None

            task = wait_for(finished, args.timeout, "training", 10)
            train_seconds = time.monotonic() - submitted_at
            stats = client.info()["train_stats"].get(args.model, {})
            results = []
            infer_seconds = []
            for name in to_evaluate:
                start = time.monotonic()
                label_file, _ = client.infer(args.model, name, {})
                infer_seconds.append(time.monotonic() - start)
                reference, spacing, affine = load_reference(cases[name]["label"])
                predicted = nib.load(label_file)
                assert predicted.shape == reference.shape and np.allclose(predicted.affine, affine)
                results.append(
                    dice_and_hd95(np.asarray(predicted.dataobj), reference, labels, spacing)
                )
                Path(label_file).unlink(missing_ok=True)
    dice = mean_over_cases(results, labels)["dice"]
    report = {
        "data": str(args.data),
        "model": args.model,
        "labels_at_start": args.labeled,
        "labels_submitted_through_client": len(to_submit),
        "train_status": task.get("status"),
        "train_seconds_from_first_submit": round(train_seconds, 1),
        "train_stats": {
            k: stats.get(k)
            for k in (
                "epoch",
                "total_epochs",
                "best_metric",
                "total_time",
                "losses",
                "processes",
                "labeled",
                "validation",
                "unlabeled",
            )
        },
        "evaluated_unlabeled_studies": len(results),
        "served_ensemble_dice": dice,
        "served_ensemble_mean_dice": float(np.mean(list(dice.values()))),
        "mean_infer_seconds": round(float(np.mean(infer_seconds)), 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
