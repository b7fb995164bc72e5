"""Preprocessing planned from the data (``cotrain/planning.py``), in the CLI and in the app:
tiny synthetic NIfTI folders (CT-like, MR-like, large, mixed spacings, damaged files)."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from cotrain.cli import _planned_settings, build_parser
from cotrain.config import TrainConfig
from cotrain.planning import (
    CT_WINDOW,
    Fingerprint,
    apply_plan,
    network_strides,
    plan_from_fingerprint,
    plan_preprocessing,
)
from tests.app_helpers import APP_DIR, use_app_lib


def _write(
    folder: Path,
    name: str,
    data: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _ct_folder(folder: Path, count: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        data = rng.integers(-1024, 1500, size=(64, 64, 20)).astype(np.int16)
        _write(folder, f"ct_{i}", data, (0.8, 0.8, 2.5))
    return folder


def _fingerprint(shapes: list[list[int]], spacings: list[list[float]]) -> Fingerprint:
    """A fingerprint of MR-like images with these shapes and spacings (no files)."""
    return Fingerprint(
        spatial_dims=len(shapes[0]),
        shapes=shapes,
        spacings=spacings,
        percentiles={"0.5": 0.0, "50": 300.0, "99.5": 790.0, "min": 0.0, "max": 800.0},
        integer_valued=False,
        intensity_images=len(shapes),
    )


def test_ct_like_images_get_a_ct_window_and_a_patch_inside_the_median_shape(
    tmp_path: Path,
) -> None:
    plan = plan_preprocessing(_ct_folder(tmp_path / "ct"))
    assert plan.intensity == CT_WINDOW and plan.modality == "ct"
    assert plan.target_spacing is None  # all share 0.8 x 0.8 x 2.5 mm
    assert plan.median_shape == (64, 64, 20) and plan.median_spacing == (0.8, 0.8, 2.5)
    assert plan.roi_size == (64, 64, 16)  # 20 rounded down to a multiple of 8
    assert all(r <= s for r, s in zip(plan.roi_size, plan.median_shape, strict=True))
    assert plan.num_images == 3 and plan.intensity_percentiles["0.5"] < -900
    assert any("looks like CT" in r for r in plan.reasons)
    TrainConfig(roi_size=plan.roi_size, intensity=plan.intensity)  # valid settings


def test_mr_like_images_get_zscore(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(40, 48, 36), (44, 48, 36), (40, 52, 30)]):
        data = (rng.random(shape) * 800).astype(np.float32)
        _write(tmp_path, f"mr_{i}", data, (1.0, 1.0, 1.0))
    plan = plan_preprocessing(tmp_path)
    assert plan.intensity == "zscore" and plan.modality == "mr"
    assert plan.target_spacing is None
    assert plan.roi_size == (40, 48, 32)


def test_large_volumes_are_capped_by_the_voxel_budget(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path, f"big_{i}", np.zeros((250, 230, 180), np.int16), (1.0, 1.0, 1.0))
    plan = plan_preprocessing(tmp_path)
    assert math.prod(plan.roi_size) <= 96**3
    assert all(s % 8 == 0 and s >= 16 for s in plan.roi_size)
    assert max(plan.roi_size) - min(plan.roi_size) <= 8  # the largest sides shrank first
    small = plan_from_fingerprint(
        _fingerprint([[250, 230, 180]] * 2, [[1.0] * 3] * 2), strides=[2, 2, 2, 2], max_voxels=64**3
    )
    assert math.prod(small.roi_size) <= 64**3 and all(s % 16 == 0 for s in small.roi_size)


def test_anisotropic_patches_span_similar_lengths() -> None:
    plan = plan_from_fingerprint(_fingerprint([[512, 512, 100]] * 3, [[0.8, 0.8, 2.5]] * 3))
    extents = [r * s for r, s in zip(plan.roi_size, (0.8, 0.8, 2.5), strict=True)]
    assert math.prod(plan.roi_size) <= 96**3 and max(extents) / min(extents) < 1.3
    assert plan.roi_size[2] < plan.roi_size[0]


def test_mixed_spacings_resample_to_the_median(tmp_path: Path) -> None:
    for i, spacing in enumerate([1.0, 1.2, 1.5]):
        _write(tmp_path, f"m_{i}", np.zeros((60, 60, 60), np.float32), (spacing,) * 3)
    plan = plan_preprocessing(tmp_path)
    assert plan.target_spacing == pytest.approx((1.2, 1.2, 1.2))
    assert plan.roi_size == (56, 56, 56)  # median resampled shape 60 * 1.2 / 1.2


def test_strongly_anisotropic_data_use_the_10th_percentile_along_the_coarse_axis() -> None:
    spacings = [[0.8, 0.8, 5.0], [0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 2.5]]
    plan = plan_from_fingerprint(_fingerprint([[200, 200, 30]] * 4, spacings))
    assert plan.target_spacing is not None
    assert plan.target_spacing[:2] == pytest.approx((0.8, 0.8))
    assert plan.target_spacing[2] == pytest.approx(np.percentile([5, 5, 4, 2.5], 10), abs=1e-4)
    assert any("10th percentile" in r for r in plan.reasons)


def test_identical_spacings_keep_the_grid() -> None:
    spacings = [[1.0, 1.0, 3.0], [1.005, 0.998, 3.01], [1.0, 1.0, 3.0]]  # within 1%
    plan = plan_from_fingerprint(_fingerprint([[64, 64, 32]] * 3, spacings))
    assert plan.target_spacing is None


def test_2d_images_are_planned_in_2d(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path, f"slice_{i}", np.ones((130, 100), np.float32), (0.5, 0.5, 1.0))
    plan = plan_preprocessing(tmp_path)
    assert plan.roi_size == (128, 96) and plan.target_spacing is None


def test_shapes_are_read_in_ras_order(tmp_path: Path) -> None:
    # Voxel axis 0 runs along S (2 mm), axis 1 along R, axis 2 along A.
    affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    _write(tmp_path, "sagittal", np.zeros((24, 64, 48), np.float32), (), affine)
    plan = plan_preprocessing(tmp_path)
    assert plan.median_shape == (64, 48, 24) and plan.median_spacing == (1.0, 1.0, 2.0)


def test_explicit_settings_win_over_the_plan(tmp_path: Path) -> None:
    plan = plan_preprocessing(_ct_folder(tmp_path))
    filled = apply_plan({"roi_size": [32, 32, 32], "target_spacing": None}, plan)
    assert filled == {"roi_size": [32, 32, 32], "target_spacing": None, "intensity": CT_WINDOW}
    assert apply_plan({}, plan)["roi_size"] == [64, 64, 16]

    # The CLI: the three options default to "planned"; the ones given win.
    args = build_parser().parse_args(
        ["train", "--method", "dct_seg", "--data", "d", "--output", "o"]
    )
    assert (args.roi, args.spacing, args.intensity) == (None, None, None)
    args.roi, args.spacing = [32, 32, 32], ["none"]
    images = [str(p) for p in sorted(tmp_path.glob("*.nii.gz"))]
    settings, used = _planned_settings(args, images, {"channels": [8, 16, 32], "strides": [2, 2]})
    assert settings == {"roi_size": [32, 32, 32], "target_spacing": None, "intensity": CT_WINDOW}
    assert used is not None and used.roi_size == (64, 64, 20)  # multiples of 4 for 2 strides
    args.intensity = "zscore"
    assert _planned_settings(args, images, {})[1] is None  # all given: nothing is read


def test_unreadable_images_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _ct_folder(tmp_path, count=1)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    with caplog.at_level(logging.WARNING, logger="cotrain.planning"):
        plan = plan_preprocessing(tmp_path)
    assert plan.num_images == 1 and "broken.nii.gz" in plan.skipped
    assert "broken.nii.gz" in caplog.text


def test_no_readable_image_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no NIfTI images"):
        plan_preprocessing(tmp_path / "empty")
    (tmp_path / "empty" / "broken.nii.gz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot plan preprocessing from .*empty.*broken"):
        plan_preprocessing(tmp_path / "empty")


def test_network_strides() -> None:
    assert network_strides({}) == [2, 2, 2]
    assert network_strides({"channels": [8, 16], "strides": [2]}) == [2]
    assert network_strides({"architecture": "segresnet", "blocks_down": [1, 2, 2, 4]}) == [2] * 3
    assert network_strides({"architecture": "basicunet"}) == [2] * 4


# ----------------------------------------------------------------------------- the app


def _app_config(model_dir: Path, studies: Path, **conf: str) -> object:
    use_app_lib()
    from lib.configs.dct_seg import DCTSegModel

    config = DCTSegModel()
    config.init(
        "dct_seg", str(model_dir), {"models": "dct_seg", **conf}, None, studies=str(studies)
    )
    return config


def test_app_plans_from_the_studies_and_shows_the_plan_in_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    studies = _ct_folder(tmp_path / "studies")
    planned = _app_config(tmp_path / "model", studies)
    c = planned.settings.train_config
    assert (c.roi_size, c.target_spacing, c.intensity) == ((64, 64, 16), None, CT_WINDOW)
    assert planned.plan_info()["planned"] == ["roi_size", "target_spacing", "intensity"]

    # Other models, and the train and scoring subprocesses, reuse the studies' fingerprint
    # while the images are unchanged; --conf wins over the plan.
    import lib.configs.base as base

    def unread(*args: object, **kwargs: object) -> None:
        raise AssertionError("the images were read again")

    monkeypatch.setattr(base, "fingerprint_images", unread)
    config = _app_config(tmp_path / "model", studies, roi_size="[32,32,16]")
    c = config.settings.train_config
    assert (c.roi_size, c.target_spacing, c.intensity) == ((32, 32, 16), None, CT_WINDOW)
    info = config.plan_info()
    assert info["planned"] == ["target_spacing", "intensity"]
    assert info["intensity"] == CT_WINDOW and info["plan"]["modality"] == "ct"
    assert any("looks like CT" in r for r in info["reasons"])
    assert any("roi_size: set by --conf" in r for r in info["reasons"])

    # /info: each model's entry carries its plan.
    spec = importlib.util.spec_from_file_location("cotrain_app_main_plan", APP_DIR / "main.py")
    assert spec is not None and spec.loader is not None
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    app = object.__new__(main.CoTrainApp)
    app.models = {"dct_seg": config}
    app.name, app.description, app.version, app.labels = "app", "", "0", None
    app._infers = {"dct_seg": config.infer()}
    app._trainers, app._strategies, app._scoring_methods = {}, {}, {}
    app._datastore = SimpleNamespace(status=dict, get_unlabeled_images=list)
    entry = app.info()["models"]["dct_seg"]
    assert entry["plan"] == info
    assert entry["scoring"]["unlabeled"] == 0  # /info also counts the scored studies


def test_app_with_empty_studies_uses_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    config = _app_config(tmp_path / "model", tmp_path / "studies")
    c, d = config.settings.train_config, TrainConfig()
    assert (c.roi_size, c.target_spacing, c.intensity) == (d.roi_size, None, d.intensity)
    assert "no NIfTI images" in config.plan_info()["reasons"][0]
    given = _app_config(
        tmp_path / "model", tmp_path / "studies", intensity="zscore", roi_size="32"
    ).plan_info()
    assert given["planned"] == ["target_spacing"] and given["roi_size"] == [32, 32, 32]
