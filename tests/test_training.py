"""Training on small synthetic 3D volumes: each method lowers its loss and segments well above
chance; checkpoints resume; a failed or stopped run publishes nothing."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from cotrain.checkpoint import load_file
from cotrain.data import training_transforms
from cotrain.engine import (
    BUDGET_PROBE_STEPS,
    BUDGET_REPLAN_STEPS,
    CHECKPOINT_FILE,
    MODEL_FILE,
    TrainCallback,
    Trainer,
    TrainingStopped,
    TrainState,
)
from cotrain.inference import EnsemblePredictor
from cotrain.methods import METHOD_CLASSES
from tests.conftest import tiny_config


def split(cases: list[dict[str, str]]) -> tuple[list, list, list]:
    labeled = cases[:3]
    unlabeled = [{"image": c["image"]} for c in cases[3:9]]
    validation = cases[9:12]
    return labeled, unlabeled, validation


def retrain_of(
    tmp_path: Path, config, labeled: list, unlabeled: list, recorder: TrainCallback
) -> Trainer:
    """A retrain in ``tmp_path/second`` warm-started from the model of ``tmp_path/first``."""
    return Trainer(
        config,
        labeled,
        unlabeled,
        tmp_path / "second",
        callbacks=[recorder],
        init_model=tmp_path / "first" / MODEL_FILE,
    )


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.iterations: list[TrainState] = []
        self.epochs: list[TrainState] = []
        self.started = self.ended = 0

    def on_train_start(self, state: TrainState) -> None:
        self.started += 1

    def on_iteration_end(self, state: TrainState) -> None:
        self.iterations.append(TrainState(**state.to_dict()))

    def on_epoch_end(self, state: TrainState) -> None:
        self.epochs.append(TrainState(**state.to_dict()))

    def on_train_end(self, state: TrainState) -> None:
        self.ended += 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "perturb_unlabeled"),
    [(method, False) for method in METHOD_CLASSES] + [("dct_seg", True), ("duo_segnet", True)],
)
def test_method_lowers_loss_and_segments_above_chance(
    method: str, perturb_unlabeled: bool, synthetic_cases, tmp_path: Path
) -> None:
    labeled, unlabeled, validation = split(synthetic_cases)
    config = tiny_config(
        method=method, epochs=4, iterations_per_epoch=10, perturb_unlabeled=perturb_unlabeled
    )
    recorder = Recorder()
    state = Trainer(
        config, labeled, unlabeled, tmp_path, validation=validation, callbacks=[recorder]
    ).fit()

    first = sum(s.losses["supervised"] for s in recorder.iterations[:5]) / 5
    last = sum(s.losses["supervised"] for s in recorder.iterations[-5:]) / 5
    assert last < 0.6 * first, f"{method}: supervised loss {first:.3f} -> {last:.3f}"
    # The organ fills ~5% of each volume: an all-foreground guess scores ~0.1 Dice.
    assert state.best_metric > 0.7, f"{method}: soft-vote Dice {state.best_metric:.3f}"
    assert len(state.metrics["member_dice"]) == config.members
    assert all(d > 0.5 for d in state.metrics["member_dice"])
    assert state.metrics["disagreement"] >= 0.0
    # Progress is reported the way a progress bar needs it.
    assert recorder.started == recorder.ended == 1
    assert [s.epoch for s in recorder.epochs] == [1, 2, 3, 4]
    assert len(recorder.iterations) == 40
    assert all(math.isfinite(v) for s in recorder.iterations for v in s.losses.values())
    assert (tmp_path / MODEL_FILE).is_file()


@pytest.mark.slow
def test_strong_recipe_trains_and_keeps_labels_on_the_image(
    synthetic_cases, tmp_path: Path
) -> None:
    """nnU-Net's augmentation and SGD: labels stay label values, aligned with their image."""
    config = tiny_config(augmentation="strong", optimizer="sgd", learning_rate=0.01)
    transform = training_transforms(config, labeled=True)
    transform.set_random_state(0)
    for _ in range(20):
        patch = transform(synthetic_cases[0])[0]
        label = patch["label"].as_tensor()
        assert label.dtype == torch.long and set(label.unique().tolist()) <= {0, 1}
    labeled, unlabeled, validation = split(synthetic_cases)
    config = tiny_config(
        augmentation="strong",
        optimizer="sgd",
        learning_rate=0.01,
        epochs=4,
        iterations_per_epoch=10,
    )
    trainer = Trainer(config, labeled, unlabeled, tmp_path, validation=validation)
    state = trainer.fit()
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert state.best_metric > 0.7, f"soft-vote Dice {state.best_metric:.3f}"


def test_published_model_predicts_in_the_image_space(synthetic_cases, tmp_path: Path) -> None:
    labeled, unlabeled, validation = split(synthetic_cases)
    Trainer(tiny_config(epochs=1, iterations_per_epoch=2), labeled, unlabeled, tmp_path).fit()
    predictor = EnsemblePredictor.load(tmp_path / MODEL_FILE, device="cpu")
    assert predictor.labels == {"organ": 1}
    prediction = predictor.predict_file(validation[0]["image"], members=True, uncertainty=True)
    assert prediction.label.shape == (32, 32, 32)
    assert prediction.member_labels.shape == (2, 32, 32, 32)
    assert set(prediction.label.ravel().tolist()) <= {0, 1}
    assert (prediction.uncertainty >= -1e-6).all()


def test_checkpoint_holds_everything_and_resume_continues(synthetic_cases, tmp_path: Path) -> None:
    labeled, unlabeled, validation = split(synthetic_cases)
    config = tiny_config(method="duo_segnet", epochs=2, iterations_per_epoch=3)
    Trainer(config, labeled, unlabeled, tmp_path, validation=validation).fit()
    checkpoint = load_file(tmp_path / CHECKPOINT_FILE)
    for key in (
        "config",
        "ensemble",
        "optimizer",
        "lr_scheduler",
        "scaler",
        "method",
        "auxiliary_optimizers",
        "state",
    ):
        assert key in checkpoint, key
    assert any(k.startswith("critic.") for k in checkpoint["method"])
    assert checkpoint["state"]["epoch"] == 2

    # Continue the same run to 3 epochs: it starts at epoch 3 with the saved weights and history.
    longer = tiny_config(method="duo_segnet", epochs=3, iterations_per_epoch=3)
    recorder = Recorder()
    trainer = Trainer(
        longer,
        labeled,
        unlabeled,
        tmp_path,
        validation=validation,
        callbacks=[recorder],
        resume=True,
    )
    state = trainer.fit()
    assert [s.epoch for s in recorder.epochs] == [3]
    assert len(recorder.iterations) == 3
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert state.history[:2] == checkpoint["state"]["history"]


def test_warm_start_loads_the_served_weights(synthetic_cases, tmp_path: Path) -> None:
    labeled, unlabeled, _ = split(synthetic_cases)
    Trainer(
        tiny_config(epochs=1, iterations_per_epoch=2), labeled, unlabeled, tmp_path / "first"
    ).fit()
    served = load_file(tmp_path / "first" / MODEL_FILE)["ensemble"]["state_dict"]
    trainer = Trainer(
        tiny_config(epochs=1, iterations_per_epoch=1, learning_rate=1e-12),
        labeled,
        unlabeled,
        tmp_path / "second",
        init_model=tmp_path / "first" / MODEL_FILE,
    )
    trainer.fit()
    after = trainer.ensemble.state_dict()
    key = next(k for k in served if k.endswith("weight"))
    torch.testing.assert_close(after[key], served[key], atol=1e-6, rtol=0)


def test_a_retrain_continues_the_critic_ramps_and_warms_up(synthetic_cases, tmp_path: Path) -> None:
    """Duo-SegNet's retrain starts from the served run's critic and its optimiser (not a new,
    random judge), with its unlabeled terms at full weight, and its learning rate warms up
    instead of hitting the served weights with full-size first steps."""
    labeled, unlabeled, _ = split(synthetic_cases)
    first = Trainer(
        tiny_config(method="duo_segnet", epochs=2, iterations_per_epoch=3),
        labeled,
        unlabeled,
        tmp_path / "first",
    )
    first.fit()
    critic = {k: v.clone() for k, v in first.method.critic.state_dict().items()}
    recorder = Recorder()
    config = tiny_config(method="duo_segnet", epochs=2, iterations_per_epoch=30, learning_rate=0.01)
    retrain = retrain_of(tmp_path, config, labeled, unlabeled, recorder)
    retrain.setup()
    assert retrain.state.continued
    for name, value in retrain.method.critic.state_dict().items():
        torch.testing.assert_close(value, critic[name])
    assert retrain.method.critic_optimizer.state_dict()["state"]  # RMSprop's averages too
    retrain.fit()
    first_step = recorder.iterations[0].losses
    p = retrain.method.params
    assert first_step["weight/agreement"] == p.lambda_u  # the ramps are complete
    assert first_step["weight/adversarial"] == p.lambda_c
    assert retrain.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # decayed
    # Warm-up: 3 of 60 steps, from a tenth of the rate; a fresh run starts at the full rate.
    fresh = Trainer(config, labeled, unlabeled, tmp_path / "fresh")
    fresh.setup()
    assert not fresh.state.continued
    warm = retrain.build_lr_scheduler(torch.optim.SGD([torch.zeros(1)], lr=0.01), True)
    assert warm.get_last_lr()[0] < 0.5 * fresh.lr_scheduler.get_last_lr()[0]

    # From another method's model: the weights only, ramps from the start.
    other = Trainer(
        tiny_config(method="dct_seg", epochs=1, iterations_per_epoch=2),
        labeled,
        unlabeled,
        tmp_path / "other",
        init_model=tmp_path / "first" / MODEL_FILE,
    )
    other.setup()
    assert not other.state.continued


def test_short_runs_leave_the_ramps_part_way_and_the_retrain_continues_them(
    synthetic_cases, tmp_path: Path
) -> None:
    """With ``min_ramp_iterations`` N, a first training of 4 iterations is 4/N of the way up
    its ramps (members trained a few steps are not yet pushed to agree), its model records the
    4 iterations, and the retrain that continues it goes on from 4/N instead of starting at
    full weight; a run of at least N iterations ramps over its own length, as before."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(method="jsd", epochs=1, iterations_per_epoch=4, min_ramp_iterations=40)
    first_steps = Recorder()
    first = Trainer(config, labeled, unlabeled, tmp_path / "first", callbacks=[first_steps])
    first.fit()
    full = first.method.params.lambda_cot
    last = first_steps.iterations[-1].losses["weight/agreement"]
    assert last == pytest.approx(first.method.loss_weights(3 / 40)["agreement"])
    assert last < 0.2 * full
    assert load_file(tmp_path / "first" / MODEL_FILE)["trained_iterations"] == 4

    retrain_steps = Recorder()
    retrain = retrain_of(tmp_path, config, labeled, unlabeled, retrain_steps)
    retrain.fit()
    assert retrain.state.continued and retrain.state.trained_before == 4
    weights = [s.losses["weight/agreement"] for s in retrain_steps.iterations]
    assert weights[0] == pytest.approx(first.method.loss_weights(4 / 40)["agreement"])
    assert weights == sorted(weights) and weights[-1] < full
    assert load_file(tmp_path / "second" / MODEL_FILE)["trained_iterations"] == 8

    long_run = Trainer(
        tiny_config(method="jsd", epochs=10, iterations_per_epoch=4, min_ramp_iterations=40),
        labeled,
        unlabeled,
        tmp_path / "long",
    )
    long_run.setup()
    assert [long_run.ramp_progress(p) for p in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="min_ramp_iterations"):
        tiny_config(min_ramp_iterations=-1)


def test_a_supervised_warmup_trains_the_labels_alone_then_the_method(
    synthetic_cases, tmp_path: Path
) -> None:
    """With ``supervised_warmup_iterations`` W, the first W steps of a model's life draw no
    unlabeled batch and train the supervised term alone (every other weight 0); then the
    method's terms start at the weight their ramps have reached. A retrain that continues a
    model trained for fewer than W iterations finishes the warm-up, and not more."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(
        method="dct_seg",
        epochs=2,
        iterations_per_epoch=3,
        perturb_unlabeled=True,
        supervised_warmup_iterations=4,
        min_ramp_iterations=40,
    )
    recorder = Recorder()
    trainer = Trainer(config, labeled, unlabeled, tmp_path / "first", callbacks=[recorder])
    drawn: list[bool] = []
    original = trainer.train_step

    def recording(batch, progress, every_term=False, warmup=False):
        drawn.append(batch.unlabeled is not None)
        return original(batch, progress, every_term, warmup)

    trainer.train_step = recording  # type: ignore[method-assign]
    trainer.fit()
    assert drawn == [False] * 4 + [True] * 2
    warm, method = recorder.iterations[:4], recorder.iterations[4:]
    for step in warm:
        assert set(step.losses) == {"supervised", "total"} | {
            f"weight/{name}" for name in ("supervised", "agreement", "diversity")
        }
        assert step.losses["weight/supervised"] == 1.0 and step.losses["weight/agreement"] == 0.0
    expected = trainer.method.loss_weights(4 / 40)["agreement"]
    assert expected > 0
    assert method[0].losses["weight/agreement"] == pytest.approx(expected)
    assert method[0].losses["agreement"] > 0
    # The epoch means: each term over the steps that computed it.
    assert recorder.epochs[-1].losses["agreement"] == pytest.approx(
        (method[0].losses["agreement"] + method[1].losses["agreement"]) / 2
    )

    retrain_steps = Recorder()
    retrain = retrain_of(
        tmp_path,
        dataclasses.replace(config, supervised_warmup_iterations=8),
        labeled,
        unlabeled,
        retrain_steps,
    )
    retrain.fit()
    assert retrain.state.trained_before == 6
    agreement = [s.losses["weight/agreement"] for s in retrain_steps.iterations]
    assert agreement[:2] == [0.0, 0.0] and min(agreement[2:]) > 0
    with pytest.raises(ValueError, match="supervised_warmup_iterations"):
        tiny_config(supervised_warmup_iterations=-1)


@pytest.mark.parametrize("method", ["duo_segnet", "mean_teacher"])
def test_the_methods_own_state_in_a_supervised_warmup(
    method: str, synthetic_cases, tmp_path: Path
) -> None:
    """During the warm-up Duo-SegNet's critic does not train (it starts with its terms), and
    Mean Teacher's EMA teachers follow the members (they are its targets once it ends)."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(method=method, epochs=1, iterations_per_epoch=3)
    trainer = Trainer(
        dataclasses.replace(config, supervised_warmup_iterations=3), labeled, unlabeled, tmp_path
    )
    trainer.setup()  # fit sets up again, with the same seeds: the same initial state

    def own_state() -> list[torch.Tensor]:
        own = trainer.method.critic if method == "duo_segnet" else trainer.method.teachers
        return [p.detach().clone() for p in own.parameters()]

    before = own_state()
    trainer.fit()
    after = own_state()
    moved = any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert moved == (method == "mean_teacher")


def test_a_budget_is_planned_again_when_the_warmup_ends(synthetic_cases, tmp_path: Path) -> None:
    """A budgeted run whose supervised warm-up (cheap steps) ends in its first epoch plans
    its length again from the method's own, slower steps, and ends within its budget instead
    of running the epoch the cheap steps planned."""
    budget_s, slow, warmup = 8.0, 0.25, 10
    state, recorder, _ = run_on_simulated_machine(
        synthetic_cases,
        tmp_path,
        budget_s,
        100,
        50,
        fast=1 / 64,
        slow=slow,
        count=warmup,
        method="jsd",
        supervised_warmup_iterations=warmup,
    )
    steps = recorder.iterations
    assert [s.losses["weight/agreement"] == 0.0 for s in steps[: warmup + 1]] == [True] * warmup + [
        False
    ]
    # Planned from the cheap steps alone, its first epoch (46 steps) would end at 9.2 s.
    assert len(steps) < 46
    assert budget_s - 2 * slow <= state.elapsed_s <= budget_s


class Explode(TrainCallback):
    """Corrupts the members after the first iteration so that the next loss is NaN."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref

    def on_iteration_end(self, state: TrainState) -> None:
        with torch.no_grad():
            for p in self.trainer_ref[0].ensemble.parameters():
                p.fill_(float("nan"))


def test_nan_loss_fails_the_run_and_publishes_nothing(synthetic_cases, tmp_path: Path) -> None:
    labeled, unlabeled, _ = split(synthetic_cases)
    ref: list = []
    trainer = Trainer(
        tiny_config(method="jsd"), labeled, unlabeled, tmp_path, callbacks=[Explode(ref)]
    )
    ref.append(trainer)
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.fit()
    assert not (tmp_path / MODEL_FILE).exists()


def test_a_stopped_run_publishes_nothing_and_keeps_the_old_model(
    synthetic_cases, tmp_path: Path
) -> None:
    labeled, unlabeled, _ = split(synthetic_cases)
    Trainer(tiny_config(epochs=1, iterations_per_epoch=1), labeled, unlabeled, tmp_path).fit()
    before = (tmp_path / MODEL_FILE).read_bytes()

    class StopSoon(TrainCallback):
        def on_iteration_end(self, state: TrainState) -> None:
            trainer.request_stop()

    trainer = Trainer(
        tiny_config(epochs=3, iterations_per_epoch=2),
        labeled,
        unlabeled,
        tmp_path,
        callbacks=[StopSoon()],
    )
    with pytest.raises(TrainingStopped):
        trainer.fit()
    assert (tmp_path / MODEL_FILE).read_bytes() == before


def test_two_process_gloo_training_keeps_members_identical(
    synthetic_msd: Path, tmp_path: Path
) -> None:
    """The multi-GPU path (torchrun, averaged gradients) run on CPU with gloo and 2 processes."""
    import os
    import subprocess
    import sys

    from cotrain.launch import free_port

    port = str(free_port())  # torchrun needs a real port (0 hangs its rendezvous)
    output = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            "-m",
            "cotrain",
            "train",
            "--method",
            "duo_segnet",
            "--data",
            str(synthetic_msd),
            "--labeled",
            "3",
            "--output",
            str(output),
            "--epochs",
            "1",
            "--iterations",
            "3",
            "--roi",
            "32",
            "32",
            "32",
            "--channels",
            "8",
            "16",
            "--device",
            "cpu",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
        env=env,
        check=False,
    )
    # The engine checks at the end that both processes' members are identical (it raises if not).
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"model"') == 1  # only rank 0 reports and publishes
    assert (output / MODEL_FILE).is_file()


@pytest.mark.parametrize("method", ["dct_seg", "duo_segnet"])
def test_two_dimensional_images_train_and_predict(method: str, tmp_path: Path) -> None:
    from cotrain.data import list_msd_cases
    from cotrain.synthetic import write_synthetic_msd

    write_synthetic_msd(tmp_path / "msd", 8, shape=(48, 40), spacing=(0.8, 0.8))
    cases = list_msd_cases(tmp_path / "msd")
    config = tiny_config(method=method, roi_size=(32, 32), epochs=3, iterations_per_epoch=10)
    state = Trainer(
        config,
        cases[:3],
        [{"image": c["image"]} for c in cases[3:6]],
        tmp_path / "run",
        validation=cases[6:],
    ).fit()
    assert state.best_metric > 0.5, f"2D {method}: soft-vote Dice {state.best_metric:.3f}"
    prediction = EnsemblePredictor.load(tmp_path / "run" / MODEL_FILE, device="cpu").predict_file(
        cases[7]["image"]
    )
    assert prediction.label.shape == (48, 40)


class SimulatedMachine:
    """A machine whose training steps take ``fast`` seconds for the first ``count`` of them,
    then ``slow`` (another job starts on it), on a simulated clock that the trainer reads: the
    budget tests are exact, whatever the load of the machine that runs them. Setting up takes
    no time. Step times are binary fractions, so the clock adds up without rounding."""

    def __init__(self, trainer: Trainer, fast: float, slow: float | None = None, count: int = 0):
        self.fast, self.slow, self.count = fast, fast if slow is None else slow, count
        self.now, self.steps = 0.0, 0
        step = trainer.train_step

        def timed_step(*args, **kwargs):
            self.steps += 1
            self.now += self.fast if self.count == 0 or self.steps <= self.count else self.slow
            return step(*args, **kwargs)

        trainer.clock = lambda: self.now  # type: ignore[method-assign]
        trainer.train_step = timed_step  # type: ignore[method-assign]


def run_on_simulated_machine(
    synthetic_cases,
    tmp_path: Path,
    budget_s: float,
    epochs: int,
    iterations_per_epoch: int,
    fast: float,
    slow: float | None = None,
    count: int = 0,
    **settings,
) -> tuple[TrainState, Recorder, Trainer]:
    """A run with a time budget on a :class:`SimulatedMachine` (steps of ``fast`` seconds,
    ``slow`` ones after the first ``count`` when given); ``settings``: more of the config."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        time_budget_minutes=budget_s / 60,
        val_interval=0,
        **settings,
    )
    recorder = Recorder()
    trainer = Trainer(config, labeled, unlabeled, tmp_path, callbacks=[recorder])
    SimulatedMachine(trainer, fast=fast, slow=slow, count=count)
    return trainer.fit(), recorder, trainer


def test_a_one_epoch_budget_follows_a_machine_that_slows_down(
    synthetic_cases, tmp_path: Path
) -> None:
    """Planned from fast first steps, a run whose budget holds less than one epoch re-plans as
    its steps slow down (another job on the machine), and still ends near its budget."""
    budget_s, slow = 3.0, 0.25
    state, recorder, _ = run_on_simulated_machine(
        synthetic_cases, tmp_path, budget_s, 1, 400, fast=1 / 64, slow=slow, count=5
    )
    # Planned from the fast steps alone it would have run about 190 steps (48 s at the slow
    # speed); re-planned every BUDGET_REPLAN_STEPS steps, it overruns by less than one re-plan.
    assert len(recorder.iterations) == state.iterations_per_epoch < 400
    assert budget_s - slow <= state.elapsed_s <= budget_s + BUDGET_REPLAN_STEPS * slow


def test_a_budget_of_many_epochs_follows_a_machine_that_slows_down(
    synthetic_cases, tmp_path: Path
) -> None:
    """Planned from fast first steps, a run of many short epochs whose steps become 8 times
    slower (another job on the machine) is shortened within an epoch of the slowdown: it ends
    within its budget, with its learning rate decayed to 0, not cut after its last planned
    step with the rate still high."""
    budget_s, slow = 8.0, 0.5
    state, recorder, trainer = run_on_simulated_machine(
        synthetic_cases, tmp_path, budget_s, 100, 5, fast=1 / 16, slow=slow, count=20
    )
    assert len(recorder.iterations) == state.total_epochs * state.iterations_per_epoch
    epoch_s = state.iterations_per_epoch * slow
    assert budget_s - 2 * epoch_s <= state.elapsed_s <= budget_s
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_a_time_budget_is_filled_by_shorter_epochs_not_cut_to_whole_ones(
    synthetic_cases, tmp_path: Path
) -> None:
    """Planned from its first steps, a budget that holds two configured epochs and a part of a
    third trains about as many steps as fit, in three shortened epochs, instead of stopping
    after the two whole ones."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(epochs=50, iterations_per_epoch=20, time_budget_minutes=1.0)
    trainer = Trainer(config, labeled, unlabeled, tmp_path)
    trainer.setup()
    trainer.state.iteration = 4  # the warm-up step and the timed ones
    trainer.fit_to_budget(elapsed_s=6.0, seconds=1.0, per="step")  # 54 + 4 steps fit
    assert (trainer.config.epochs, trainer.config.iterations_per_epoch) == (3, 19)
    assert trainer.lr_scheduler.total_iters == 3 * 19


def test_the_budget_is_planned_from_steps_that_do_every_terms_work(
    synthetic_cases, tmp_path: Path
) -> None:
    """DCT-Seg's diversity term has weight 0 for the first 10% of a run and is skipped then;
    the steps a budget is planned from compute it anyway, so the plan prices it in."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(
        method="dct_seg", epochs=10, iterations_per_epoch=30, time_budget_minutes=0.5
    )
    trainer = Trainer(config, labeled, unlabeled, tmp_path)
    calls: list[bool] = []
    original = trainer.train_step

    def recording(batch, progress, every_term=False, **kwargs):
        calls.append(every_term)
        if len(calls) == BUDGET_PROBE_STEPS + 3:
            trainer.request_stop()
        return original(batch, progress, every_term, **kwargs)

    trainer.train_step = recording  # type: ignore[method-assign]
    with pytest.raises(TrainingStopped):
        trainer.fit()
    assert calls[: BUDGET_PROBE_STEPS + 1] == [True] * (BUDGET_PROBE_STEPS + 1)
    assert not any(calls[BUDGET_PROBE_STEPS + 1 :])


def test_the_budget_is_not_planned_with_a_term_the_run_never_ramps_up_to(
    synthetic_cases, tmp_path: Path
) -> None:
    """With ``min_ramp_iterations`` far beyond the run, DCT-Seg's diversity term (it starts at
    10% of the ramps' span) stays off for the whole run: the probe steps leave it out too,
    rather than planning a shorter run for work it will never do."""
    labeled, unlabeled, _ = split(synthetic_cases)
    config = tiny_config(
        method="dct_seg",
        epochs=10,
        iterations_per_epoch=30,
        time_budget_minutes=0.5,
        min_ramp_iterations=100_000,
    )
    recorder = Recorder()
    trainer = Trainer(config, labeled, unlabeled, tmp_path, callbacks=[recorder])
    original = trainer.train_step

    def stopping(batch, progress, every_term=False, **kwargs):
        if len(recorder.iterations) == BUDGET_PROBE_STEPS + 2:
            trainer.request_stop()
        return original(batch, progress, every_term, **kwargs)

    trainer.train_step = stopping  # type: ignore[method-assign]
    with pytest.raises(TrainingStopped):
        trainer.fit()
    probes = recorder.iterations[: BUDGET_PROBE_STEPS + 1]
    assert all(s.losses["diversity"] == 0.0 and s.losses["agreement"] > 0 for s in probes)


@pytest.mark.parametrize(
    ("epochs", "iterations_per_epoch", "budget_s"),
    [(20, 5, 4.0), (1, 200, 3.0)],  # many short epochs; one epoch longer than the budget
)
def test_a_time_budget_shortens_the_run_and_still_publishes(
    epochs: int, iterations_per_epoch: int, budget_s: float, synthetic_cases, tmp_path: Path
) -> None:
    """A retrain bounded in time measures its steps, plans fewer of them, schedules the
    learning rate over the planned length, and publishes a model that says what it ran."""
    step = 0.125
    state, recorder, trainer = run_on_simulated_machine(
        synthetic_cases, tmp_path, budget_s, epochs, iterations_per_epoch, fast=step
    )

    planned = state.total_epochs * state.iterations_per_epoch
    assert planned < epochs * iterations_per_epoch  # the configured run (>= 12 s) did not fit
    assert len(recorder.iterations) == planned  # it ran what it planned, no more, no less
    # It fills its budget, to within an epoch (5 steps) or the steps between two re-plans.
    assert budget_s - (BUDGET_REPLAN_STEPS + 1) * step <= state.elapsed_s <= budget_s
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # decayed
    published = load_file(tmp_path / MODEL_FILE)["config"]
    assert (published["epochs"], published["iterations_per_epoch"]) == (
        state.total_epochs,
        state.iterations_per_epoch,
    )
    # What Slicer's progress bar reads: the planned length, from the first steps on.
    assert recorder.iterations[-1].total_epochs == state.total_epochs
