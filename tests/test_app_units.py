"""Unit tests of the MONAI Label app's pieces: conf parsing, model selection, the retrain
scheduler, the validation split, train stats and the disagreement strategy (on a real
MONAI Label local datastore)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from monailabel.datastore.local import LocalDatastore

from cotrain.engine import TrainState
from cotrain.schedules import split_validation, validation_hash
from cotrain.studies import write_demo_studies
from tests.app_helpers import APP_DIR, use_app_lib

use_app_lib()

from lib.activelearning.disagreement import Disagreement  # noqa: E402
from lib.activelearning.expected_error import ExpectedError  # noqa: E402
from lib.configs.dct_seg import DCTSegModel  # noqa: E402
from lib.scheduler import COALESCED, QUEUED, STARTED, TrainScheduler  # noqa: E402
from lib.settings import parse_model_settings  # noqa: E402
from lib.trainers.stats import TrainStatsWriter  # noqa: E402


def _load_main() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cotrain_app_main", APP_DIR / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- conf parsing


def test_conf_defaults() -> None:
    settings = parse_model_settings({"models": "dct_seg"}, "dct_seg", "dct_seg")
    c = settings.train_config
    assert c.method == "dct_seg"
    assert c.labels == {"organ": 1}
    assert settings.auto_train is True
    assert settings.min_labels >= 1
    assert 0 < settings.val_split < 1


def test_conf_values_are_parsed() -> None:
    conf = {
        "labels": '{"anterior": 1, "posterior": 2}',
        "members": "3",
        "roi_size": "48",
        "target_spacing": "1,1,1.5",
        "intensity": "ct:-1000,1000",
        "epochs": "7",
        "learning_rate": "0.002",
        "network": '{"channels": [8, 16, 32], "strides": [2, 2]}',
        "amp": "false",
        "perturb_unlabeled": "true",
        "unlabeled_cutout": "0.25",
        "auto_train": "no",
        "min_labels": "4",
        "val_split": "0.25",
        "duo_segnet.epochs": "9",
    }
    settings = parse_model_settings(conf, "dct_seg", "dct_seg")
    c = settings.train_config
    assert c.labels == {"anterior": 1, "posterior": 2}
    assert c.members == 3
    assert c.roi_size == (48, 48, 48)
    assert c.target_spacing == (1.0, 1.0, 1.5)
    assert c.intensity == "ct:-1000,1000"
    assert c.epochs == 7
    assert c.learning_rate == pytest.approx(0.002)
    assert c.network == {"channels": [8, 16, 32], "strides": [2, 2]}
    assert c.amp is False
    assert c.perturb_unlabeled is True and c.unlabeled_cutout == pytest.approx(0.25)
    assert settings.auto_train is False
    assert settings.min_labels == 4
    assert settings.val_split == pytest.approx(0.25)
    # A model-prefixed key wins for that model only.
    assert parse_model_settings(conf, "duo_segnet", "duo_segnet").train_config.epochs == 9


def test_served_dct_seg_defaults_to_the_benchmarked_recipe() -> None:
    """The served DCT-Seg perturbs the unlabeled batch and focuses its agreement (the
    benchmark's best recipe); a ``method_params`` conf changes the hyperparameters it names and
    keeps the others, and the paper's settings are one conf away."""

    def served(conf: dict[str, str]) -> Any:
        return parse_model_settings(
            conf, "dct_seg", DCTSegModel.method, DCTSegModel.defaults
        ).train_config

    tuned = {"agreement_focus": 0.5, "lambda_mix": 1.0, "diversity_every": 4, "mix_every": 2}
    default = served({})
    assert default.perturb_unlabeled is True
    assert default.method_params == tuned

    changed = served({"method_params": '{"lambda_cot":1.0}'})
    assert changed.method_params == {**tuned, "lambda_cot": 1.0}
    assert DCTSegModel.defaults["method_params"] == tuned  # not mutated

    paper = served(
        {
            "perturb_unlabeled": "false",
            "method_params": '{"agreement_focus":0,"lambda_mix":0,"diversity_every":1}',
        }
    )
    assert paper.perturb_unlabeled is False
    assert paper.method_params == {
        "agreement_focus": 0,
        "lambda_mix": 0,
        "diversity_every": 1,
        "mix_every": 2,  # kept, and idle without the copy-paste term
    }


@pytest.mark.parametrize(
    ("labels", "expected"),
    [('["liver", "tumor"]', {"liver": 1, "tumor": 2}), ("spleen", {"spleen": 1})],
)
def test_conf_labels_as_names(labels: str, expected: dict[str, int]) -> None:
    settings = parse_model_settings({"labels": labels}, "dct_seg", "dct_seg")
    assert settings.train_config.labels == expected


def test_conf_keeps_the_grid_and_rejects_bad_values() -> None:
    settings = parse_model_settings({"target_spacing": "none"}, "dct_seg", "dct_seg")
    assert settings.train_config.target_spacing is None
    with pytest.raises(ValueError, match="epochs"):
        parse_model_settings({"epochs": "many"}, "dct_seg", "dct_seg")
    with pytest.raises(ValueError, match="min_labels"):
        parse_model_settings({"min_labels": "0"}, "dct_seg", "dct_seg")
    with pytest.raises(ValueError, match="intensity"):
        parse_model_settings({"intensity": "minmax"}, "dct_seg", "dct_seg")


@pytest.mark.parametrize(
    ("method_params", "named"),
    [
        ('{"lambda_uu": 1}', "unknown dct_seg parameters: lambda_uu"),
        ('{"agreement_focus": 1.5}', "agreement_focus"),
    ],
)
def test_conf_rejects_bad_method_params_at_startup(method_params: str, named: str) -> None:
    """A misspelt or out-of-range hyperparameter stops the server at start, naming it, instead
    of failing the first training hours later."""
    with pytest.raises(ValueError, match=named):
        parse_model_settings(
            {"method_params": method_params}, "dct_seg", DCTSegModel.method, DCTSegModel.defaults
        )


def test_the_baseline_takes_the_shared_settings_it_can_use() -> None:
    """A server-wide setting of the co-training models does not stop the supervised baseline
    (it has no unlabeled perturbation or hyperparameters); named for it, it still does."""
    from lib.configs import SupervisedModel

    conf = {"perturb_unlabeled": "true", "method_params": '{"agreement_focus":0}', "epochs": "3"}
    settings = parse_model_settings(conf, "supervised", SupervisedModel.method)
    config = settings.train_config
    assert (config.method, config.perturb_unlabeled, config.epochs) == ("supervised", False, 3)
    with pytest.raises(ValueError, match="not to 'supervised'"):
        parse_model_settings(
            {"supervised.perturb_unlabeled": "true"}, "supervised", SupervisedModel.method
        )


def test_every_served_model_trains_with_the_same_strong_recipe() -> None:
    """The co-training models and the baseline are served with nnU-Net's augmentation, so the
    baseline is as strong as they are, and with ramps over at least 1000 iterations of a
    model's life; --conf augmentation flip --conf min_ramp_iterations 0 gives the papers'
    recipe."""
    from lib.configs import DuoSegNetModel, SupervisedModel

    for model in (DCTSegModel, DuoSegNetModel, SupervisedModel):
        served = parse_model_settings({}, model.method, model.method, model.defaults)
        assert served.train_config.augmentation == "strong", model.method
        assert served.train_config.min_ramp_iterations == 1000, model.method
        papers = parse_model_settings(
            {"augmentation": "flip", "min_ramp_iterations": "0"},
            model.method,
            model.method,
            model.defaults,
        )
        assert papers.train_config.augmentation == "flip"
        assert papers.train_config.min_ramp_iterations == 0
    dct = parse_model_settings({}, "dct_seg", DCTSegModel.method, DCTSegModel.defaults)
    assert dct.train_config.method_params == {
        "agreement_focus": 0.5,
        "lambda_mix": 1.0,
        "diversity_every": 4,
        "mix_every": 2,
    }


def test_select_models() -> None:
    main = _load_main()
    assert main.select_models({"models": "dct_seg"}) == ["dct_seg"]
    assert main.select_models({"models": "all"}) == ["dct_seg", "duo_segnet"]
    assert main.select_models({"models": "duo_segnet, dct_seg"}) == ["dct_seg", "duo_segnet"]
    # The supervised baseline is served when named, not with "all".
    assert main.select_models({"models": "dct_seg,supervised"}) == ["dct_seg", "supervised"]
    assert main.select_models({"models": "supervised"}) == ["supervised"]
    with pytest.raises(ValueError, match="provide --conf models"):
        main.select_models({})
    with pytest.raises(ValueError, match="unknown model"):
        main.select_models({"models": "unet"})


# ----------------------------------------------------------------------------- scheduler


class TrainQueue:
    """Stands in for MONAI Label's single-worker train queue (``AsyncTask`` semantics)."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []

    def submit(self, model: str) -> None:
        self.tasks.append({"status": "SUBMITTED", "request": {"model": model}})

    def list_tasks(self) -> list[dict[str, Any]]:
        return [dict(t) for t in self.tasks]

    def step(self) -> None:
        """Finish the running task (if any) and start the next submitted one."""
        for task in self.tasks:
            if task["status"] == "RUNNING":
                task["status"] = "DONE"
                break
        for task in self.tasks:
            if task["status"] == "SUBMITTED":
                task["status"] = "RUNNING"
                break


def test_submits_before_a_started_run_reads_the_labels_are_coalesced() -> None:
    """Two labels submitted in a row: the run that the first started has not read the labels
    yet when the second arrives (its process is still starting), so one run covers both; once
    it reads them, a new label needs a follow-up run."""
    queue = TrainQueue()
    reading: dict[str, bool] = {"dct_seg": False}
    scheduler = TrainScheduler(
        submit=queue.submit, list_tasks=queue.list_tasks, reading_labels=reading.__getitem__
    )
    assert scheduler.request(["dct_seg"]) == {"dct_seg": STARTED}
    queue.step()  # RUNNING: the subprocess starts
    assert scheduler.request(["dct_seg"]) == {"dct_seg": COALESCED}
    assert len(queue.tasks) == 1
    reading["dct_seg"] = True  # it has begun reading the labels
    assert scheduler.request(["dct_seg"]) == {"dct_seg": QUEUED}
    assert [t["status"] for t in queue.tasks] == ["RUNNING", "SUBMITTED"]


def test_scheduler_runs_one_and_keeps_at_most_one_pending() -> None:
    queue = TrainQueue()
    scheduler = TrainScheduler(submit=queue.submit, list_tasks=queue.list_tasks)

    assert scheduler.request(["dct_seg"]) == {"dct_seg": STARTED}
    # Submits before the run started are covered by it.
    assert scheduler.request(["dct_seg"]) == {"dct_seg": COALESCED}
    queue.step()  # the run starts: it read the datastore now
    assert scheduler.request(["dct_seg"]) == {"dct_seg": QUEUED}
    for _ in range(5):  # a burst while it runs: one follow-up run covers them all
        assert scheduler.request(["dct_seg"]) == {"dct_seg": COALESCED}
    assert [t["status"] for t in queue.tasks] == ["RUNNING", "SUBMITTED"]
    assert scheduler.status("dct_seg") == (True, True)

    queue.step()  # the follow-up starts; a new submit needs another run
    assert scheduler.request(["dct_seg"]) == {"dct_seg": QUEUED}
    queue.step()
    queue.step()
    assert [t["status"] for t in queue.tasks] == ["DONE", "DONE", "DONE"]
    assert scheduler.status("dct_seg") == (False, False)
    assert scheduler.request([]) == {}


def test_scheduler_handles_models_separately() -> None:
    queue = TrainQueue()
    scheduler = TrainScheduler(submit=queue.submit, list_tasks=queue.list_tasks)
    assert scheduler.request(["dct_seg", "duo_segnet"]) == {
        "dct_seg": STARTED,
        "duo_segnet": QUEUED,
    }
    assert scheduler.request(["dct_seg", "duo_segnet"]) == {
        "dct_seg": COALESCED,
        "duo_segnet": COALESCED,
    }
    assert len(queue.tasks) == 2


# ----------------------------------------------------------------------------- train task pieces


def _case(name: str, folder: str = "/studies") -> dict[str, str]:
    return {"image": f"{folder}/{name}.nii.gz", "label": f"{folder}/labels/final/{name}.nii.gz"}


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_split_validation_keeps_roles_as_labels_are_added(order: str) -> None:
    """Labels submitted one by one: below val_min_labels nothing is held out; then no case
    changes role, except the documented guard: a stand-in validation case (used while no case
    hashes below val_split) goes back to training when a case replaces it."""
    names = [f"case_{i:03d}" for i in range(40)]
    if order == "shuffled":
        random.Random(3).shuffle(names)
    cases = [_case(n) for n in names]
    roles: dict[str, str] = {}
    for n in range(1, len(cases) + 1):
        train, val = split_validation(cases[:n], 0.2, 5)
        assert train and train == [c for c in cases[:n] if c not in val]
        assert sorted(c["image"] for c in train + val) == sorted(c["image"] for c in cases[:n])
        assert (len(val) > 0) == (n >= 5)  # nothing held out below val_min_labels
        now = {c["image"]: "train" for c in train} | {c["image"]: "validation" for c in val}
        for image, role in roles.items():
            if now[image] != role and n > 5:
                stand_in = role == "validation" and validation_hash({"image": image}) >= 0.2
                assert stand_in and now[image] == "train", (n, image)
        roles = now
    hashed = [c for c in cases if validation_hash(c) < 0.2]
    assert val == hashed  # after the stand-in phase: exactly the cases hashing below val_split


def test_split_validation_depends_on_the_image_id_only() -> None:
    cases = [_case(f"img{i}") for i in range(2000)]
    train, val = split_validation(cases, 0.2, 5)
    assert abs(len(val) / len(cases) - 0.2) < 0.03  # the fraction approaches val_split
    moved = [_case(f"img{i}", "/elsewhere") for i in reversed(range(2000))]
    assert {Path(c["image"]).name for c in split_validation(moved, 0.2, 5)[1]} == {
        Path(c["image"]).name for c in val
    }  # same roles from another folder, in another order
    assert split_validation(cases[:4], 0.2, 5) == (cases[:4], [])  # too few labels
    assert split_validation(cases[:10], 0.0, 5) == (cases[:10], [])
    train, val = split_validation(cases[:2], 0.9, 1)
    assert len(train) == 1 and len(val) == 1  # at least one case stays for training
    train, val = split_validation(cases[:2], 0.99, 1)
    assert len(train) == 1 and len(val) == 1


def test_train_stats_writer(tmp_path: Path) -> None:
    path = tmp_path / "model" / "train_stats.json"
    writer = TrainStatsWriter(path, {"name": "dct_seg", "total_epochs": 4}, min_interval_s=60)
    writer.write(None)
    stats = json.loads(path.read_text())
    assert stats["status"] == "RUNNING" and stats["epoch"] == 0 and stats["total_epochs"] == 4
    assert "total_time" not in stats and "current_time" in stats

    state = TrainState(epoch=2, total_epochs=4, iteration=3, iterations_per_epoch=3)
    state.losses = {"supervised": 0.5, "total": float("nan")}
    state.metrics = {"vote_dice": 0.8, "member_dice": [0.7, 0.75], "disagreement": 0.01}
    state.best_metric, state.best_epoch = 0.8, 2
    writer.on_epoch_end(state)
    stats = json.loads(path.read_text())  # strict JSON: NaN became null
    assert stats["epoch"] == 2 and stats["best_metric"] == 0.8
    assert stats["progress"] == 0.5
    # Half done in 30 s: the planned run ends in about 30 s more (Slicer's end time).
    assert stats["planned_iterations"] == 12
    state.elapsed_s = 30.0
    writer.on_epoch_end(state)
    stats = json.loads(path.read_text())
    assert stats["expected_end_ts"] == pytest.approx(time.time() + 30, abs=3)
    assert stats["member_dice"] == [0.7, 0.75] and stats["disagreement"] == 0.01
    assert stats["losses"] == {"supervised": 0.5, "total": None}

    state.iteration = 1
    writer.min_interval_s = 0.0
    writer.on_iteration_end(state)  # first iteration of epoch 3
    assert json.loads(path.read_text())["progress"] == pytest.approx(7 / 12, abs=1e-4)
    state.epoch, state.iteration = 4, 3
    writer.write(state, status="DONE")
    stats = json.loads(path.read_text())
    assert stats["status"] == "DONE" and "total_time" in stats and stats["progress"] == 1.0
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary files


def test_train_stats_before_validation_reports_zero(tmp_path: Path) -> None:
    writer = TrainStatsWriter(tmp_path / "s.json", {})
    assert writer.stats(TrainState(best_metric=-1.0), "RUNNING")["best_metric"] == 0.0


# ----------------------------------------------------------------------------- strategy


@pytest.fixture
def datastore(tmp_path: Path) -> LocalDatastore:
    write_demo_studies(tmp_path / "studies", num_images=5, num_labeled=1, shape=(8, 8, 8))
    return LocalDatastore(str(tmp_path / "studies"), auto_reload=False)


def _score(datastore: LocalDatastore, image: str, **scores: float) -> None:
    datastore.update_image_info(
        image, {f"disagreement_{model}": {"score": s} for model, s in scores.items()}
    )


def _served(datastore: LocalDatastore, image: str, client: str | None, age_s: float) -> None:
    entry = {"ts": int(time.time() - age_s), "client_id": client}
    datastore.update_image_info(image, {"strategy": {"disagreement": entry}})


def test_disagreement_picks_the_most_uncertain(datastore: LocalDatastore) -> None:
    strategy = Disagreement()
    # Before any scoring: an unlabeled image, in id order.
    assert strategy({"strategy": "disagreement"}, datastore)["id"] == "case_001"
    _score(datastore, "case_001", dct_seg=0.1)
    _score(datastore, "case_002", dct_seg=0.3, duo_segnet=0.5)  # mean over models: 0.4
    _score(datastore, "case_003", dct_seg=0.2)
    assert strategy({}, datastore) == {"id": "case_002", "disagreement": pytest.approx(0.4)}
    # case_000 is labeled: never proposed even with a high score.
    _score(datastore, "case_000", dct_seg=9.0)
    assert strategy({}, datastore)["id"] == "case_002"


def test_expected_error_ranks_by_the_votes_expected_dice_error(datastore: LocalDatastore) -> None:
    for image, score, error in (("case_001", 0.9, 0.1), ("case_002", 0.1, 0.3)):
        datastore.update_image_info(
            image, {"disagreement_dct_seg": {"score": score, "dice_error": error}}
        )
    # Scored by an older version (no dice_error): after the scored images.
    _score(datastore, "case_003", dct_seg=5.0)
    assert ExpectedError()({}, datastore) == {"id": "case_002", "expected_error": 0.3}
    assert Disagreement()({}, datastore)["id"] == "case_003"


def test_disagreement_skips_images_served_to_other_clients(datastore: LocalDatastore) -> None:
    strategy = Disagreement(served_timeout_s=600)
    for image, score in (("case_001", 0.1), ("case_002", 0.4), ("case_003", 0.3)):
        _score(datastore, image, dct_seg=score)
    _served(datastore, "case_002", "annotator-a", age_s=10)
    assert strategy({"client_id": "annotator-b"}, datastore)["id"] == "case_003"
    assert strategy({"client_id": "annotator-a"}, datastore)["id"] == "case_002"
    assert strategy({}, datastore)["id"] == "case_003"  # anonymous: never the same client
    # An old reservation has expired.
    _served(datastore, "case_002", "annotator-a", age_s=3600)
    assert strategy({"client_id": "annotator-b"}, datastore)["id"] == "case_002"


def test_disagreement_when_everything_is_reserved(datastore: LocalDatastore) -> None:
    for age, image in ((30, "case_001"), (20, "case_002"), (50, "case_003"), (10, "case_004")):
        _served(datastore, image, "someone", age_s=age)
    assert Disagreement()({"client_id": "me"}, datastore)["id"] == "case_003"


def test_disagreement_with_nothing_left(tmp_path: Path) -> None:
    write_demo_studies(tmp_path / "s", num_images=2, num_labeled=2, shape=(8, 8, 8))
    assert Disagreement()({}, LocalDatastore(str(tmp_path / "s"), auto_reload=False)) is None


def test_former_conf_name_views_sets_members() -> None:
    """Servers started with the former ``--conf views N`` keep their member count."""
    assert parse_model_settings({"views": "3"}, "dct_seg", "dct_seg").train_config.members == 3
    conf = {"views": "3", "dct_seg.members": "4"}
    assert parse_model_settings(conf, "dct_seg", "dct_seg").train_config.members == 4


def test_retrain_budget_follows_the_device_the_setting_and_the_request(tmp_path: Path) -> None:
    """Retrains are bounded in time by default (longer for a first training and on a GPU);
    --conf and a train request change it; the run's config carries the bound."""
    from lib.settings import DEFAULT_BUDGET_MINUTES
    from lib.trainers.co_training import CoTrainTask

    defaults = parse_model_settings({}, "dct_seg", DCTSegModel.method, DCTSegModel.defaults)
    for device, (retrain, first) in DEFAULT_BUDGET_MINUTES.items():
        assert defaults.budget_minutes(device, warm_start=True) == retrain
        assert defaults.budget_minutes(device, warm_start=False) == first
        assert first >= retrain > 0
    assert DEFAULT_BUDGET_MINUTES["cuda"][0] >= DEFAULT_BUDGET_MINUTES["cpu"][0]

    conf = {"retrain_minutes": "5", "dct_seg.first_train_minutes": "0"}
    settings = parse_model_settings(conf, "dct_seg", DCTSegModel.method, DCTSegModel.defaults)
    task = CoTrainTask(
        "dct_seg",
        str(tmp_path / "dct_seg.pt"),
        str(tmp_path / "dct_seg"),
        settings.train_config,
        budget_minutes=settings.budget_minutes,
    )
    assert task.run_config({}, "cpu", warm_start=True).time_budget_minutes == 5.0
    assert task.run_config({}, "cuda", warm_start=False).time_budget_minutes == 0.0  # unbounded
    request = {"time_budget_minutes": 2.5, "max_epochs": 3}
    config = task.run_config(request, "cpu", warm_start=True)
    assert (config.time_budget_minutes, config.epochs) == (2.5, 3)
    with pytest.raises(ValueError, match="retrain_minutes must be >= 0"):
        parse_model_settings({"retrain_minutes": "-1"}, "dct_seg", DCTSegModel.method)


def test_supervised_warmup_follows_the_device_unless_set(tmp_path: Path) -> None:
    """A co-training model left to its defaults trains its first iterations supervised on a CPU
    server and not on a GPU one (shown in the train options); --conf and a train request set
    it; the supervised baseline, which has no unlabeled terms, neither gets nor shows one."""
    from lib.configs import SupervisedModel
    from lib.settings import DEFAULT_WARMUP_ITERATIONS
    from lib.trainers.co_training import CoTrainTask

    def task(conf: dict[str, str], model: Any = DCTSegModel) -> CoTrainTask:
        settings = parse_model_settings(conf, model.method, model.method, model.defaults)
        return CoTrainTask(
            model.method,
            str(tmp_path / f"{model.method}.pt"),
            str(tmp_path / model.method),
            settings.train_config,
            device_settings=settings.device_settings,
        )

    default = task({})
    assert DEFAULT_WARMUP_ITERATIONS["cpu"] > DEFAULT_WARMUP_ITERATIONS["cuda"] == 0
    for device, iterations in DEFAULT_WARMUP_ITERATIONS.items():
        assert default.run_config({}, device).supervised_warmup_iterations == iterations
    assert default.config()["supervised_warmup_iterations"] == DEFAULT_WARMUP_ITERATIONS["cpu"]

    set_ = task({"dct_seg.supervised_warmup_iterations": "0"})
    assert set_.run_config({}, "cpu").supervised_warmup_iterations == 0
    assert set_.config()["supervised_warmup_iterations"] == 0
    request = {"supervised_warmup_iterations": "50"}
    assert default.run_config(request, "cpu").supervised_warmup_iterations == 50

    baseline = task({}, SupervisedModel)
    assert baseline.run_config({}, "cpu").supervised_warmup_iterations == 0
    assert "supervised_warmup_iterations" not in baseline.config()


def test_scoring_budget_is_a_share_of_the_retrain_budget_unless_set() -> None:
    """One scoring run gets a quarter of the device's default retrain budget; --conf
    score_minutes sets it (0: no bound); a negative value is refused at start-up."""
    from lib.settings import DEFAULT_BUDGET_MINUTES

    defaults = parse_model_settings({}, "dct_seg", DCTSegModel.method, DCTSegModel.defaults)
    for device, (retrain, _) in DEFAULT_BUDGET_MINUTES.items():
        assert 0 < defaults.scoring_minutes(device) < retrain
    set_ = parse_model_settings({"score_minutes": "0"}, "dct_seg", DCTSegModel.method)
    assert set_.scoring_minutes("cpu") == 0.0
    with pytest.raises(ValueError, match="score_minutes must be >= 0"):
        parse_model_settings({"score_minutes": "-2"}, "dct_seg", DCTSegModel.method)


def test_next_sample_queues_no_redundant_scoring_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI Label asks for scoring after every next-sample: the server starts a run only when
    a study is left to score with the served model and no run already waits to start."""
    from monailabel.interfaces.app import MONAILabelApp

    main = _load_main()
    queued: list[Any] = []
    monkeypatch.setattr(MONAILabelApp, "async_scoring", lambda self, m, p=None: queued.append(m))
    waiting: list[dict[str, str]] = []
    monkeypatch.setattr(main, "background_tasks", lambda method: waiting)

    def ask(pending: bool) -> None:
        """The server's call, on an app with nothing but what the method reads."""
        app = main.CoTrainApp.__new__(main.CoTrainApp)
        app._server_mode, app._scoring_methods = True, {"disagreement_dct_seg": None}
        app._scoring_pending = lambda: pending
        app.async_scoring(None)

    ask(pending=False)
    assert queued == []  # everything is scored with the served model
    ask(pending=True)
    assert queued == [None]
    waiting.append({"status": "SUBMITTED"})
    ask(pending=True)
    assert queued == [None]  # one already waits to start
    waiting[0]["status"] = "RUNNING"
    ask(pending=True)
    assert queued == [None, None]


# ----------------------------------------------------------------------------- server memory
def test_infer_hands_freed_memory_back_to_the_system() -> None:
    """The long-lived server returns what a prediction freed (glibc keeps it per thread
    otherwise, and the server's memory creeps up from publish to publish)."""
    import ctypes.util
    import threading

    from lib.infers import ensemble

    if ctypes.util.find_library("c") is None or ensemble._MALLOC_TRIM is None:
        pytest.skip("this C library has no malloc_trim")

    def churn() -> None:  # what a prediction leaves in a worker thread's arena
        blocks = [bytearray(64 * 1024) for _ in range(2000)]
        del blocks[::2]
        blocks.clear()

    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    assert ensemble.release_freed_memory() is True


def test_server_subprocesses_wait_without_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainings and scoring runs started by the server inherit a passive OpenMP wait policy
    (spinning threads of one take the CPU cores from the others); a setting given at launch
    is kept."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    main = _load_main()
    assert main.LAUNCH_WAIT_POLICY is None
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert _load_main().LAUNCH_WAIT_POLICY == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
