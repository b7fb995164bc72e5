"""Which active-learning score ranks the unlabeled studies by the served model's real error?

A strategy that proposes the study with the highest score helps only if the score finds the
studies the model segments worst. This benchmark takes a served ensemble left by an annotation
session (``bench/session.py --work DIR``: ``DIR/ARM-seedS/app/model/MODEL.pt`` and the
studies folder beside it) and, for every study still unlabeled there whose ground truth is
known, computes the soft vote's real Dice error (1 - Dice on the image's grid, mean over the
classes) and each score:

- ``disagreement``: the members' mean Jensen-Shannon divergence over the volume (the
  ``disagreement`` strategy);
- ``dice_error``: the Dice error the vote expects of its own label (the ``expected_error``
  strategy, :func:`cotrain.inference.expected_dice_error`);
- ``disagreement_per_foreground``: the divergence summed over the volume per voxel the vote
  labels foreground (the divergence made relative to the organ's size);
- ``member_dice_disagreement``: 1 - the Dice between the members' own labels;
- ``image_voxels``: the volume's size on the model's grid (a control: a score that follows it
  ranks crops, not errors).

It prints and writes, per model, the Spearman correlation of each score with the real error
and the mean real error of the ``--top`` studies each score ranks first, against the mean over
all. The truth of the unlabeled studies is the data set's own labels of cases in the studies
folder, the pool a session picks from, never its scoring cases.

Run (after a session)::

    python bench/pick_signal.py --name r8-expected \\
        --models bench/work/session-exp-0/dct_seg-expected_error-seed0/app/model/dct_seg.pt ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cotrain.inference import (  # noqa: E402
    EnsemblePredictor,
    expected_dice_error,
    mean_jensen_shannon,
    soft_vote,
)
from cotrain.losses import jensen_shannon_map  # noqa: E402
from cotrain.metrics import dice_and_hd95, load_reference  # noqa: E402

logger = logging.getLogger(__name__)

RESULTS = ROOT / "bench" / "results"
DEFAULT_TRUTH = ROOT.parent / "shared" / "data" / "hippocampus" / "labelsTr"
SCORES = (
    "disagreement",
    "dice_error",
    "disagreement_per_foreground",
    "member_dice_disagreement",
    "image_voxels",
)


def member_dice_disagreement(member_logits: torch.Tensor) -> float:
    """1 - the mean Dice, over foreground classes and member pairs, of the members' labels."""
    labels = member_logits[:, 0].argmax(dim=1)  # (k, *spatial)
    k, num_classes = member_logits.shape[0], member_logits.shape[2]
    dice = []
    for c in range(1, num_classes):
        for i in range(k):
            for j in range(i + 1, k):
                a, b = labels[i] == c, labels[j] == c
                total = float(a.sum() + b.sum())
                dice.append(2 * float((a & b).sum()) / total if total else 1.0)
    return 1.0 - float(np.mean(dice))


def study_row(predictor: EnsemblePredictor, image: Path, truth: Path) -> dict[str, Any]:
    """The real error and every score of one study."""
    logits = predictor.member_logits(predictor.load_image(image))
    foreground = int((soft_vote(logits).argmax(dim=1) > 0).sum())
    divergence = float(jensen_shannon_map(logits).sum(dtype=torch.float64))
    reference, _, _ = load_reference(truth)
    label = predictor.predict_file(image).label
    dice = dice_and_hd95(label, reference, predictor.labels)["dice"]
    return {
        "id": image.name.removesuffix(".nii.gz"),
        "error": 1.0 - float(np.mean(list(dice.values()))),
        "disagreement": mean_jensen_shannon(logits),
        "dice_error": expected_dice_error(logits),
        "disagreement_per_foreground": divergence / max(foreground, 1),
        "member_dice_disagreement": member_dice_disagreement(logits),
        "image_voxels": int(logits[0, 0, 0].numel()),
    }


def rank_scores(rows: list[dict[str, Any]], top: int) -> dict[str, dict[str, float]]:
    """Per score: Spearman correlation with the real error (NaN for a score that is the same
    for every study: it ranks nothing), and the top studies' mean error."""
    errors = np.array([r["error"] for r in rows])
    result = {}
    for score in SCORES:
        values = np.array([r[score] for r in rows], dtype=float)
        first = np.argsort(-values, kind="stable")[:top]
        constant = np.ptp(values) == 0 or np.ptp(errors) == 0
        result[score] = {
            "spearman": math.nan if constant else float(spearmanr(values, errors).statistic),
            "top_error": float(errors[first].mean()),
        }
    return result


def model_result(model: Path, truth_dir: Path, top: int) -> dict[str, Any]:
    """Score every unlabeled study of the session the model was served in."""
    studies = model.parents[2] / "studies"
    labeled = {p.name for p in (studies / "labels" / "final").glob("*.nii.gz")}
    images = sorted(p for p in studies.glob("*.nii.gz") if p.name not in labeled)
    images = [p for p in images if (truth_dir / p.name).exists()]
    if not images:
        raise ValueError(f"{studies}: no unlabeled study with a label in {truth_dir}")
    predictor = EnsemblePredictor.load(model, device="cpu")
    start = time.monotonic()
    rows = [study_row(predictor, image, truth_dir / image.name) for image in images]
    logger.info("%s: %d studies in %.0f s", model, len(rows), time.monotonic() - start)
    return {
        "model": str(model),
        "labeled": len(labeled),
        "studies": len(rows),
        "mean_error": float(np.mean([r["error"] for r in rows])),
        "scores": rank_scores(rows, top),
        "rows": rows,
    }


def _cell(score: dict[str, float]) -> str:
    spearman = "n/a" if math.isnan(score["spearman"]) else f"{score['spearman']:+.3f}"
    return f"{spearman} ({score['top_error']:.3f})"


def report(results: list[dict[str, Any]], top: int) -> list[str]:
    """The markdown table: one row per model, Spearman and top-``top`` error per score."""
    header = " | ".join(SCORES)
    lines = [
        f"Spearman correlation of each score with the served vote's real Dice error "
        f"(top-{top} mean error in brackets) over the studies still unlabeled at the end of "
        f"the session; labels: the labels in the session's folder at its end (a model "
        f"served before the last cycle trained on fewer).",
        "",
        f"| model | labels | studies | mean error | {header} |",
        "|---|---|---|---|" + "---|" * len(SCORES),
    ]
    for r in results:
        cells = " | ".join(_cell(r["scores"][s]) for s in SCORES)
        lines.append(
            f"| `{r['model']}` | {r['labeled']} | {r['studies']} | {r['mean_error']:.3f} | "
            f"{cells} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="served MODEL.pt")
    parser.add_argument("--truth", type=Path, default=DEFAULT_TRUTH, help="labels of the pool")
    parser.add_argument("--top", type=int, default=8, help="studies a strategy would pick")
    parser.add_argument("--name", required=True, help="writes OUTPUT/pick-signal-NAME.{md,json}")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    results = [model_result(m, args.truth, args.top) for m in args.models]
    lines = report(results, args.top)
    command = "python bench/pick_signal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([f"# Pick signal `{args.name}`", "", f"Command: `{command}`", "", *lines])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"pick-signal-{args.name}.md").write_text(text + "\n")
    (args.output / f"pick-signal-{args.name}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
