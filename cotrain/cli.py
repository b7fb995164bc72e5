"""Command line: ``cotrain train | evaluate | predict | export-bundle | studies``.

Examples::

    cotrain train --method dct_seg --data ../shared/data/hippocampus --labeled 10 --output runs/hippo
    cotrain evaluate --model runs/hippo --data ../shared/data/hippocampus --cases test.txt
    cotrain predict --model runs/hippo --image X.nii.gz --output X_label.nii.gz --uncertainty X_unc.nii.gz
    cotrain export-bundle --model runs/hippo/model.pt --output bundles/hippo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from cotrain.checkpoint import MODEL_FILE
from cotrain.config import AUGMENTATIONS, OPTIMIZERS, TrainConfig
from cotrain.data import list_msd_cases, read_case_list
from cotrain.distributed import init_from_environment, is_main_process, shutdown
from cotrain.engine import TrainCallback, Trainer, TrainState
from cotrain.evaluation import evaluate_predictor
from cotrain.inference import EnsemblePredictor
from cotrain.methods import METHOD_CLASSES
from cotrain.planning import CT_WINDOW, Plan, apply_plan, network_strides, plan_preprocessing

logger = logging.getLogger("cotrain")

__all__ = ["main"]

#: The settings a run gets from the options not given (the command line's defaults), except
#: ``--roi``, ``--spacing`` and ``--intensity``: those not given are planned from the images.
DEFAULTS = TrainConfig()


class ProgressBar(TrainCallback):
    """A tqdm bar over all iterations, showing the loss terms and the latest validation Dice."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, state: TrainState) -> None:
        total = state.total_epochs * state.iterations_per_epoch
        self.bar = tqdm(
            total=total,
            initial=state.epoch * state.iterations_per_epoch,
            unit="it",
            dynamic_ncols=True,
        )

    def on_iteration_end(self, state: TrainState) -> None:
        shown = {k: f"{v:.3g}" for k, v in state.losses.items() if not k.startswith("weight/")}
        if "vote_dice" in state.metrics:
            shown["val_dice"] = f"{state.metrics['vote_dice']:.3f}"
        self.bar.set_description(f"epoch {state.epoch + 1}/{state.total_epochs}")
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def on_epoch_end(self, state: TrainState) -> None:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in state.losses.items())
        tqdm.write(f"epoch {state.epoch}/{state.total_epochs}: {terms}", file=sys.stderr)
        if state.metrics:
            m = state.metrics
            tqdm.write(
                f"  validation: vote Dice {m['vote_dice']:.4f}, members {[round(d, 4) for d in m['member_dice']]}, "
                f"disagreement {m['disagreement']:.5f}",
                file=sys.stderr,
            )

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


def _select(cases: list[dict[str, str]], names: Sequence[str], what: str) -> list[dict[str, str]]:
    by_name = {c["name"]: c for c in cases}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"{what}: unknown case names {unknown[:5]}")
    return [by_name[n] for n in names]


def _infer_labels(labeled: list[dict[str, str]]) -> dict[str, int]:
    """``{"label_1": 1, ...}`` up to the largest value found in the labeled cases' labels."""
    largest = max(int(np.asarray(nib.load(c["label"]).dataobj).max()) for c in labeled)
    if largest < 1:
        raise SystemExit("the labeled cases contain no foreground voxels; pass --labels")
    return {f"label_{v}": v for v in range(1, largest + 1)}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _spacing_value(text: str) -> float | str:
    """One ``--spacing`` value: a number, or ``none``/``original`` (keep the images' grid)."""
    if text.strip().lower() in ("none", "original"):
        return "none"
    return float(text)


def _planned_settings(
    args: argparse.Namespace, images: Sequence[str], network: dict[str, Any]
) -> tuple[dict[str, Any], Plan | None]:
    """The ``roi_size``, ``target_spacing`` and ``intensity`` of a run: each option given wins;
    the others come from a plan of ``images`` (:func:`cotrain.planning.plan_preprocessing`).

    Returns:
        The three settings and the plan (``None`` when every option was given).
    """
    given: dict[str, Any] = {}
    if args.roi is not None:
        given["roi_size"] = args.roi
    if args.spacing is not None:
        if "none" in args.spacing and len(args.spacing) > 1:
            raise SystemExit("--spacing: give numbers, or 'none' alone to keep the images' grid")
        given["target_spacing"] = None if args.spacing == ["none"] else args.spacing
    if args.intensity is not None:
        given["intensity"] = args.intensity
    if len(given) == 3:
        return given, None
    dims = next((len(v) for v in (args.roi, given.get("target_spacing")) if v), None)
    plan = plan_preprocessing(images, network_strides(network), spatial_dims=dims)
    planned = apply_plan(given, plan)
    logger.info(
        "from the plan: %s",
        ", ".join(f"{k} {planned[k]}" for k in planned if k not in given),
    )
    return planned, plan


def cmd_train(args: argparse.Namespace) -> int:
    cases = list_msd_cases(args.data)
    validation = (
        _select(cases, read_case_list(args.val_list), "--val-list") if args.val_list else []
    )
    excluded = {c["name"] for c in validation}
    if args.exclude_list:
        excluded |= set(read_case_list(args.exclude_list))
    pool = [c for c in cases if c["name"] not in excluded]
    if args.labeled_list:
        labeled = _select(pool, read_case_list(args.labeled_list), "--labeled-list")
    else:
        labeled = pool[: args.labeled]
    names = {c["name"] for c in labeled}
    if not labeled:
        raise SystemExit("no labeled cases: give --labeled N (N >= 1) or --labeled-list FILE")
    missing = [c["name"] for c in labeled if "label" not in c]
    if missing:
        raise SystemExit(f"labeled cases without a file in labelsTr: {missing[:5]}")
    unlabeled = [{"image": c["image"]} for c in pool if c["name"] not in names]

    labels = json.loads(args.labels) if args.labels else _infer_labels(labeled)
    network = {"channels": args.channels, "strides": [2] * (len(args.channels) - 1)}
    images = [c["image"] for c in labeled] + [c["image"] for c in unlabeled]
    preprocessing, plan = _planned_settings(args, images, network)
    settings: dict[str, Any] = {
        "method": args.method,
        "members": args.members,
        "labels": labels,
        **preprocessing,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "batch_size": args.batch_size,
        "unlabeled_batch_size": args.unlabeled_batch_size,
        "perturb_unlabeled": args.perturb_unlabeled,
        "unlabeled_cutout": args.unlabeled_cutout,
        "learning_rate": args.lr,
        "optimizer": args.optimizer,
        "augmentation": args.augmentation,
        "time_budget_minutes": args.time_budget,
        "seed": args.seed,
        "network": network,
        "method_params": dict(kv.split("=", 1) for kv in args.param),
        "amp": not args.no_amp,
        "num_workers": args.workers,
    }
    settings["method_params"] = {k: _parse_value(v) for k, v in settings["method_params"].items()}
    config = TrainConfig.from_dict(settings)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if plan is not None:
        (output / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    (output / "split.json").write_text(
        json.dumps(
            {
                "labeled": sorted(names),
                "validation": [c["name"] for c in validation],
                "unlabeled": len(unlabeled),
            },
            indent=2,
        )
    )
    device = init_from_environment(args.device) or args.device
    trainer = Trainer(
        config,
        labeled,
        unlabeled,
        output,
        validation=validation,
        callbacks=[ProgressBar()],
        init_model=args.init_model,
        device=device,
        resume=args.resume,
    )
    reports = is_main_process()  # read before leaving the process group
    try:
        state = trainer.fit()
    finally:
        shutdown()
    if not reports:
        return 0
    print(
        json.dumps(
            {
                "model": str(output / MODEL_FILE),
                "epochs": state.epoch,
                "seconds": round(state.elapsed_s, 1),
                "best_vote_dice": state.best_metric,
                "last_losses": state.losses,
                "plan": plan.to_dict() if plan is not None else None,
            },
            indent=2,
        )
    )
    return 0


def _model_path(model: str) -> Path:
    path = Path(model)
    return path / MODEL_FILE if path.is_dir() else path


def cmd_evaluate(args: argparse.Namespace) -> int:
    predictor = EnsemblePredictor.load(_model_path(args.model), device=args.device)
    cases = list_msd_cases(args.data)
    if args.cases:
        cases = _select(cases, read_case_list(args.cases), "--cases")
    cases = [c for c in cases if "label" in c]
    if not cases:
        raise SystemExit("no cases with labels to evaluate")
    results = evaluate_predictor(
        predictor, cases, progress=lambda c: tqdm(c, desc="evaluate", unit="case")
    )
    report = {
        "model": str(_model_path(args.model)),
        "method": predictor.config.method,
        **results,
    }
    if not args.per_case:
        del report["per_case"]
    print(json.dumps(report, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    predictor = EnsemblePredictor.load(_model_path(args.model), device=args.device)
    prediction = predictor.predict_file(args.image, uncertainty=args.uncertainty is not None)
    predictor.write_prediction(prediction, args.output, args.uncertainty)
    counts = {
        name: int((prediction.label == value).sum()) for name, value in predictor.labels.items()
    }
    print(
        json.dumps(
            {"label": args.output, "uncertainty": args.uncertainty, "voxels": counts}, indent=2
        )
    )
    return 0


def cmd_export_bundle(args: argparse.Namespace) -> int:
    from cotrain.bundle import INFERENCE_CONFIG, METADATA_FILE, export_bundle

    bundle = export_bundle(_model_path(args.model), args.output)
    print(
        json.dumps(
            {
                "bundle": str(bundle),
                "run": (
                    f"python -m monai.bundle run --config_file {bundle / INFERENCE_CONFIG} "
                    f"--meta_file {bundle / METADATA_FILE} --bundle_root {bundle} "
                    "--dataset_dir IMAGES_DIR --output_dir OUTPUT_DIR"
                ),
            },
            indent=2,
        )
    )
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from cotrain import studies

    if args.studies_command == "demo":
        try:
            written = studies.write_demo_studies(
                args.output, num_images=args.images, num_labeled=args.labeled, seed=args.seed
            )
        except FileExistsError:  # README's run command is meant to be run again
            logger.info("%s already holds studies; keeping them", args.output)
            return 0
    else:
        written = studies.import_msd_studies(args.data, args.output, num_labeled=args.labeled)
    print(json.dumps({"studies": str(args.output), "result": written}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotrain", description="Semi-supervised co-training for 3D segmentation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an ensemble on an MSD-layout folder")
    train.add_argument("--method", choices=list(METHOD_CLASSES), required=True)
    train.add_argument("--data", required=True, help="MSD folder (imagesTr/, labelsTr/)")
    train.add_argument(
        "--labeled", type=int, default=0, help="the first N cases (sorted) are labeled"
    )
    train.add_argument("--labeled-list", help="file of labeled case names, one per line")
    train.add_argument("--val-list", help="file of validation case names (never trained on)")
    train.add_argument(
        "--exclude-list", help="file of case names to leave out entirely (e.g. a test split)"
    )
    train.add_argument("--output", required=True, help="output folder (model.pt, checkpoint.pt)")
    train.add_argument(
        "--members",
        "--views",
        type=int,
        default=DEFAULTS.members,
        help="ensemble members k (--views: former name)",
    )
    train.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    train.add_argument(
        "--iterations", type=int, default=DEFAULTS.iterations_per_epoch, help="iterations per epoch"
    )
    train.add_argument("--seed", type=int, default=DEFAULTS.seed)
    train.add_argument(
        "--roi",
        "--roi-size",
        type=int,
        nargs="+",
        help="patch size (default: planned from the training images)",
    )
    train.add_argument(
        "--spacing",
        "--target-spacing",
        type=_spacing_value,
        nargs="+",
        help="target voxel size in mm, or 'none' to keep the images' grid (default: planned "
        "from the training images: their median spacing, none if they all share one)",
    )
    train.add_argument(
        "--intensity",
        help="'zscore' or 'ct:LOW,HIGH' (default: planned from the training images: "
        f"{CT_WINDOW} when they look like CT, else zscore)",
    )
    train.add_argument(
        "--labels", help='JSON label names to values, e.g. \'{"anterior": 1, "posterior": 2}\''
    )
    train.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    train.add_argument("--unlabeled-batch-size", type=int, default=DEFAULTS.unlabeled_batch_size)
    train.add_argument(
        "--perturb-unlabeled",
        action="store_true",
        help="each member sees its own flipped, intensity-perturbed copy of the unlabeled batch",
    )
    train.add_argument(
        "--unlabeled-cutout",
        type=float,
        default=DEFAULTS.unlabeled_cutout,
        help="with --perturb-unlabeled: blank a random box, this fraction of the patch side",
    )
    train.add_argument("--lr", type=float, default=DEFAULTS.learning_rate)
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULTS.optimizer,
        help="adamw, or sgd (Nesterov momentum 0.99, as nnU-Net)",
    )
    train.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default=DEFAULTS.augmentation,
        help="flip (random flips) or strong (nnU-Net's spatial and intensity augmentation)",
    )
    train.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULTS.time_budget_minutes,
        metavar="MINUTES",
        help="end the run within this wall time: the engine times its steps and trains as "
        "many as fit, at most --epochs x --iterations (0: no bound)",
    )
    train.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=list(DEFAULTS.network["channels"]),
        help="UNet channels",
    )
    train.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="method hyperparameter"
    )
    train.add_argument("--init-model", help="warm-start from this model.pt")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    train.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    train.add_argument(
        "--workers", type=int, default=DEFAULTS.num_workers, help="data loader workers"
    )
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="Dice and HD95 per class, per member and for the soft vote (JSON)"
    )
    evaluate.add_argument("--model", required=True, help="model.pt or the folder holding it")
    evaluate.add_argument("--data", required=True, help="MSD folder")
    evaluate.add_argument(
        "--cases", help="file of case names to evaluate (default: all with labels)"
    )
    evaluate.add_argument("--per-case", action="store_true", help="include each case's results")
    evaluate.add_argument("--device")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="segment one image by soft voting")
    predict.add_argument("--model", required=True, help="model.pt or the folder holding it")
    predict.add_argument("--image", required=True)
    predict.add_argument(
        "--output", required=True, help="label NIfTI (same shape and affine as the image)"
    )
    predict.add_argument("--uncertainty", help="also write the members' disagreement map here")
    predict.add_argument("--device")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export-bundle",
        help="write the ensemble as a MONAI bundle that MONAI's bundle tools run without cotrain",
    )
    export.add_argument("--model", required=True, help="model.pt or the folder holding it")
    export.add_argument(
        "--output", required=True, help="bundle folder to create (must not exist or be empty)"
    )
    export.set_defaults(func=cmd_export_bundle)

    studies = sub.add_parser("studies", help="make MONAI Label studies folders")
    studies_sub = studies.add_subparsers(dest="studies_command", required=True)
    demo = studies_sub.add_parser("demo", help="write a small synthetic demo studies folder")
    demo.add_argument("output")
    demo.add_argument("--images", type=int, default=12)
    demo.add_argument("--labeled", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    imported = studies_sub.add_parser("import-msd", help="turn an MSD folder into a studies folder")
    imported.add_argument("data", help="MSD folder")
    imported.add_argument("output")
    imported.add_argument(
        "--labeled", type=int, required=True, help="the first N labels are submitted"
    )
    studies.set_defaults(func=cmd_studies)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cotrain`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
