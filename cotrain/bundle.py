"""Export a served ensemble as a MONAI bundle that MONAI's own tools run without cotrain.

The bundle holds the member weights (``models/model.pt``, one state dict per member), an
inference configuration (``configs/inference.json``) that rebuilds every member as a plain
MONAI network and reproduces :class:`cotrain.inference.EnsemblePredictor` with MONAI
components only, metadata (``configs/metadata.json``), a logging configuration and a README:

- preprocessing: :func:`cotrain.data.preprocessing_definition` (load, channel first, RAS,
  optional resampling, z-score or CT window), the items cotrain builds its own transforms from;
- each member's logits with ``SlidingWindowInferer`` (window, overlap and blending of
  :func:`cotrain.inference.member_logits_sliding_window`), run by ``EnsembleEvaluator``;
- soft voting: ``Activationsd(softmax)`` on every member and ``MeanEnsembled``;
- ``Invertd`` takes the class probabilities back to the image's own grid, ``AsDiscreted``
  takes their argmax (the order cotrain uses), ``SaveImaged`` writes the label with the
  image's affine.

Run it with ``python -m monai.bundle run --config_file configs/inference.json ...`` (see the
README the export writes).
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import monai
import numpy
import torch
from monai.bundle import ConfigParser

from cotrain.checkpoint import DIGEST_KEY, CorruptModelError, load_file
from cotrain.config import TrainConfig, parse_intensity
from cotrain.data import preprocessing_definition
from cotrain.files import json_safe
from cotrain.inference import (
    SLIDING_WINDOW_BATCH_SIZE,
    SLIDING_WINDOW_MODE,
    SLIDING_WINDOW_OVERLAP,
    ensemble_from_payload,
)
from cotrain.networks import Ensemble
from cotrain.networks import member_definition as network_definition

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLE_VERSION",
    "INFERENCE_CONFIG",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "export_bundle",
    "inference_config",
    "member_definition",
    "member_weights_key",
]

#: Version written into the bundle's metadata.
BUNDLE_VERSION = "0.1.0"
#: Paths inside the bundle.
INFERENCE_CONFIG = "configs/inference.json"
METADATA_FILE = "configs/metadata.json"
LOGGING_CONFIG = "configs/logging.conf"
WEIGHTS_FILE = "models/model.pt"
README_FILE = "docs/README.md"

#: Published descriptions of the training methods, for the metadata's references.
_METHOD_REFERENCES = {
    "dct_seg": "Peng J., Estrada G., Pedersoli M., Desrosiers C. Deep co-training for "
    "semi-supervised image segmentation. Pattern Recognition 107 (2020) 107269.",
    "duo_segnet": "Peiris H., Chen Z., Egan G., Harandi M. Duo-SegNet: adversarial dual-views "
    "for semi-supervised medical image segmentation. MICCAI 2021.",
    "mean_teacher": "Tarvainen A., Valpola H. Mean teachers are better role models. NeurIPS 2017.",
    "cps": "Chen X., Yuan Y., Zeng G., Wang J. Semi-supervised semantic segmentation with cross "
    "pseudo supervision. CVPR 2021.",
}

_LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def member_weights_key(index: int) -> str:
    """Key of member ``index``'s state dict in the bundle's ``models/model.pt``."""
    return f"member_{index}"


def member_definition(spec: dict[str, Any]) -> dict[str, Any]:
    """One member as a MONAI bundle config item: :func:`cotrain.networks.member_definition`,
    the definition cotrain itself builds members from, as strict JSON.

    Args:
        spec: The ensemble's ``spec`` (``spatial_dims``, ``in_channels``, ``num_classes``,
            ``network``) as stored in the model file.

    Raises:
        ValueError: If the architecture is not one cotrain builds.
    """
    definition = network_definition(
        int(spec["spatial_dims"]),
        int(spec["in_channels"]),
        int(spec["num_classes"]),
        **dict(spec["network"]),
    )
    return json_safe(definition)


def inference_config(spec: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``: soft voting of the members with MONAI only.

    Args:
        spec: The ensemble's ``spec`` (see :func:`member_definition`).
        config: The configuration the ensemble was trained with.

    Returns:
        A MONAI bundle config (plain JSON data); it refers to no cotrain code.
    """
    num_members = int(spec["num_members"])
    pred_keys = [f"pred_{i}" for i in range(num_members)]
    definition = member_definition(spec)
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "output_postfix": "seg",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()" if config.amp else False,
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
        "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "network_defs": [copy.deepcopy(definition) for _ in range(num_members)],
        "networks": [f"$@network_defs#{i}.to(@device)" for i in range(num_members)],
        "preprocessing": {
            "_target_": "Compose",
            "transforms": preprocessing_definition(config, keys=("image",)),
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': path} for path in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(config.roi_size),
            "sw_batch_size": SLIDING_WINDOW_BATCH_SIZE,
            "overlap": SLIDING_WINDOW_OVERLAP,
            "mode": SLIDING_WINDOW_MODE,
        },
        "pred_keys": pred_keys,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "EnsureTyped",
                    "keys": "@pred_keys",
                    "dtype": "$torch.float32",
                    "device": "cpu",
                },
                {"_target_": "Activationsd", "keys": "@pred_keys", "softmax": True},
                {"_target_": "MeanEnsembled", "keys": "@pred_keys", "output_key": "pred"},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "@output_postfix",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                "load_dict": {member_weights_key(i): f"@networks#{i}" for i in range(num_members)},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "EnsembleEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "networks": "@networks",
            "pred_keys": "@pred_keys",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "@amp",
        },
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _metadata(payload: dict[str, Any], ensemble: Ensemble, config: TrainConfig) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (MONAI bundle specification keys plus the
    ensemble's labels, method and training record)."""
    spec = ensemble.spec
    labels = {"background": 0, **dict(sorted(config.labels.items(), key=lambda kv: kv[1]))}
    channel_def = {str(value): name for name, value in labels.items()}
    kind, window = parse_intensity(config.intensity)
    created = payload.get("created")
    trained_at = (
        datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc).isoformat()
        if isinstance(created, int | float)
        else None
    )
    metrics = json_safe(payload.get("metrics", {}))
    best_dice = metrics.get("best_metric")  # -1 when the run never validated
    validation_dice = best_dice if isinstance(best_dice, float) and best_dice >= 0 else None
    required_packages = {
        name: version
        for name in ("nibabel", "pytorch-ignite")
        if (version := _package_version(name)) is not None
    }
    num_members = len(ensemble)
    metadata: dict[str, Any] = {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported from a cotrain model file"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required_packages,
        "name": f"cotrain_{config.method}_ensemble",
        "task": f"{config.spatial_dims}D segmentation of {', '.join(config.labels)}",
        "description": (
            f"A {num_members}-member segmentation ensemble trained with the method "
            f"'{config.method}' and served by soft voting: every member's class probabilities "
            "(sliding-window inference) are averaged and the label is their argmax, in the "
            "input image's own grid."
        ),
        "authors": "The owner of the trained model (exported with cotrain)",
        "copyright": "Copyright (c) the owner of the trained model and of its training data",
        "license": (
            "The weights were trained on the model owner's data: their terms of use follow "
            "that data's license. Research use only, not for clinical diagnosis."
        ),
        "intended_use": "Research only; not for diagnostic use. Check every label by eye.",
        "data_type": "nibabel",
        "image_classes": (
            f"{spec['in_channels']}-channel image; "
            + (
                "z-score normalised over its non-zero voxels"
                if kind == "zscore"
                else f"intensities {window[0]}..{window[1]} mapped to [0, 1], clipped"
            )
        ),
        "pred_classes": "one channel of label values: "
        + ", ".join(f"{value} is {name}" for name, value in labels.items()),
        "eval_metrics": {"validation_vote_dice": validation_dice},
        "references": [_METHOD_REFERENCES[config.method]]
        if config.method in _METHOD_REFERENCES
        else [],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude" if kind == "zscore" else "hounsfield",
                    "modality": "n/a" if kind == "zscore" else "CT",
                    "num_channels": int(spec["in_channels"]),
                    "spatial_shape": list(config.roi_size),
                    "dtype": "float32",
                    "value_range": [] if kind == "zscore" else [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(i): "image" for i in range(int(spec["in_channels"]))},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "spatial_shape": ["*"] * config.spatial_dims,
                    "dtype": "uint8",
                    "value_range": [0, max(labels.values())],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
        },
        "labels": labels,
        "method": config.method,
        "members": num_members,
        "voting": "soft: mean of the members' softmax probabilities, then argmax",
        "training": {
            "method": config.method,
            "epochs": payload.get("epoch"),
            "trained_at": trained_at,
            "metrics": metrics,
            "config": json_safe(config.to_dict()),
            "model_sha256": payload.get(DIGEST_KEY),
        },
    }
    return metadata


def _readme(metadata: dict[str, Any], config: TrainConfig) -> str:
    """The bundle's ``docs/README.md``: what it is and how to run it with MONAI."""
    labels = ", ".join(f"{value} = {name}" for name, value in metadata["labels"].items())
    validation_dice = metadata["eval_metrics"]["validation_vote_dice"]
    if validation_dice is None:
        validation_dice = "not measured"
    spacing = (
        f"resampled to {list(config.target_spacing)} mm"
        if config.target_spacing
        else "not resampled"
    )
    return f"""# {metadata["name"]}

{metadata["description"]}

- Members: {metadata["members"]} ({metadata["network_data_format"]["inputs"]["image"]["num_channels"]}-channel input, {config.spatial_dims}D)
- Labels: {labels}
- Preprocessing: RAS orientation, {spacing}, intensity `{config.intensity}`
- Sliding window: roi {list(config.roi_size)}, overlap {SLIDING_WINDOW_OVERLAP}, {SLIDING_WINDOW_MODE} blending
- Best validation soft-vote Dice in training: {validation_dice}

{metadata["intended_use"]}

## Run it

Needs only MONAI with its nibabel and ignite extras (`pip install "monai[nibabel,ignite]"`),
and `fire` for MONAI's command line (`pip install fire`). From this folder:

```bash
python -m monai.bundle run \\
    --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/images --output_dir /path/to/labels
```

Every `*.nii.gz` / `*.nii` image in `--dataset_dir` is segmented; the label is written to
`--output_dir` as `NAME_seg.nii.gz`, in the image's own grid (same shape and affine).
Add `--device "\\$torch.device('cpu')"` to force the CPU.

Without `fire`, the same from Python:

```bash
python -c "from monai.bundle import run; run(config_file='configs/inference.json', \\
    meta_file='configs/metadata.json', bundle_root='.', \\
    dataset_dir='/path/to/images', output_dir='/path/to/labels')"
```

## Files

- `configs/inference.json`: preprocessing, the members (plain MONAI networks), the
  sliding-window inferer, soft voting (`Activationsd` softmax, `MeanEnsembled`), `Invertd` back to
  the image grid, argmax, `SaveImaged`; run by MONAI's `EnsembleEvaluator`.
- `models/model.pt`: one state dict per member (`member_0`, `member_1`, ...), loaded by
  MONAI's `CheckpointLoader`.
- `configs/metadata.json`: versions, labels, method, training record.
"""


def _check_member_definitions(
    definition: dict[str, Any], ensemble: Ensemble, roi_size: tuple[int, ...]
) -> None:
    """Build the members the way MONAI's bundle tools will and check that they reproduce
    the ensemble (strict state dict loading; the same logits on a test input).

    Raises:
        RuntimeError: If a rebuilt member does not load or answers differently.
    """
    parser = ConfigParser({"network": copy.deepcopy(definition)})
    reference = ensemble.members[0].cpu().eval()
    rebuilt = parser.get_parsed_content("network", instantiate=True).eval()
    try:
        rebuilt.load_state_dict(reference.state_dict(), strict=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"the exported network definition does not fit the weights: {error}"
        ) from error
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, int(ensemble.spec["in_channels"]), *roi_size, generator=generator)
    with torch.no_grad():
        if not torch.allclose(rebuilt(probe), reference(probe), atol=1e-5):
            raise RuntimeError("the exported network definition computes different logits")


def export_bundle(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write the ensemble of a cotrain model file as a MONAI bundle.

    The model file is verified first (:func:`cotrain.checkpoint.load_file`), and the bundle's
    network definitions are checked against its weights. The bundle is written to a
    temporary folder beside ``output_dir`` and moved into place at the end, so a failed
    export leaves nothing behind.

    Args:
        model_path: A ``model.pt`` written by training (or published for the server).
        output_dir: The bundle folder to create; it must not exist or be empty.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        FileNotFoundError: If there is no model file.
        CorruptModelError: If the model file is unreadable, not a cotrain model, damaged,
            or holds no ensemble.
        FileExistsError: If ``output_dir`` exists and is not an empty folder.
    """
    model_path, output_dir = Path(model_path), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(
            f"{output_dir} already exists and is not an empty folder; give a new bundle folder"
        )
    payload = load_file(model_path)
    try:
        ensemble, config = ensemble_from_payload(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CorruptModelError(
            f"{model_path} holds no usable ensemble ({type(error).__name__}: {error})"
        ) from error
    spec = ensemble.spec
    definition = member_definition(spec)
    _check_member_definitions(definition, ensemble, config.roi_size)
    metadata = _metadata(payload, ensemble, config)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        weights = {
            member_weights_key(i): {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for i, m in enumerate(ensemble.members)
        }
        torch.save(weights, staging / WEIGHTS_FILE)
        (staging / INFERENCE_CONFIG).write_text(
            json.dumps(inference_config(spec, config), indent=4) + "\n"
        )
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=4) + "\n")
        (staging / LOGGING_CONFIG).write_text(_LOGGING_CONF)
        (staging / README_FILE).write_text(_readme(metadata, config))
        if output_dir.is_dir():
            output_dir.rmdir()  # empty, checked above
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "exported the %d-member %s ensemble of %s as a MONAI bundle in %s",
        len(ensemble),
        config.method,
        model_path,
        output_dir,
    )
    return output_dir
