"""Speed benchmark: what co-training costs per step, and what serving costs per image.

One run measures, side by side and on the same inputs:

1. **Training step**: every method of ``cotrain.methods.METHOD_CLASSES`` and the tuned recipes
   (``TUNED_DCT_SEG``, ``TUNED_DUO_SEGNET``) at the quick profile's recipe (40x56x40 patches,
   2 labeled + 2 unlabeled per step, UNet 16-128, 2 members), on hippocampus cases when
   ``../shared/data/hippocampus`` exists, else on synthetic MR-like volumes. Each method's
   ``Trainer`` is set up as ``fit()`` sets it up, its batches are drawn beforehand (the time of
   ``next_batch()`` is reported on its own, as data time), and ``train_step`` is timed at
   progress 0.5 (every term active) after warm-up steps, the methods interleaved in rounds so
   that drifting machine load hits all alike. Reported: the median seconds per step and its
   ratio to the supervised 2-member step, and each method's peak memory, measured alone (on
   CUDA ``torch.cuda.max_memory_allocated``; on a CPU the peak resident memory of a spawned
   process of its own): the step's own working set (the peak minus what is held after the
   set-up) and the total.
2. **Auto-segment and scoring** with k = 1, 2, 3 members (random weights) on an MR-sized volume
   (a hippocampus image, the quick recipe's network) and a CT-sized one (512x512x160 int16,
   0.8x0.8x2.5 mm, resampled to 1.5x1.5x2.0 mm, 96x96x64 windows, UNet 16-256): end to end
   (``EnsemblePredictor.predict_file``: file to label on the image's grid), its preprocessing,
   the members' network passes (``member_logits_sliding_window``) and scoring
   (``mean_disagreement``); the median of ``--repeats``. On the CT-sized volume also the
   label back to the image grid after the network, for the random members' vote and for an
   organ-like one (the volume's own organs), against resampling every voxel back.
3. **Server round trip** (skipped with ``--no-server``, or when MONAI Label cannot start): the
   real MONAI Label server with the app serving a published 2-member model, the median of
   ``MONAILabelClient.infer`` calls against the library's ``predict_file`` on the same image
   and model.

It prints the ratio tables and the targets of the issue it serves, met or missed (a DCT-Seg
step at most 3.0x the supervised one, stretch 2.5x; Duo-SegNet at most 1.8x; on the CT-sized
volume with k = 2, end to end at most 1.25x the network time and scoring at most 1.1x
preprocessing plus network), and writes ``OUTPUT/speed-DEVICE.{json,md}``
(``speed-DEVICE-quick.*`` with ``--quick``; rewritten after every part, so a run stopped by a
time limit keeps what it measured): every number and sample, the machine (CPU model or GPU
name), the torch threads and version, the date and the command line.

    python bench/speed.py --no-server                       # CPU: one torch thread, as the benchmark machine
    python bench/speed.py --device cuda --no-server         # a GPU
    python bench/speed.py --quick --no-server --device cpu  # tiny sizes, under 30 s (the CI smoke test)
    python bench/speed.py --profile full --warmup 1 --rounds 2 --steps 1  # what a left-atrium run costs

``--profile NAME`` (default ``quick``) takes the training recipe and data of another quality
profile (``bench/profiles.py``) and that profile's own methods, measures the training step only
and adds each run's projected hours (seconds per step and per batch, times the profile's
iterations): ``speed-DEVICE-NAME.{json,md}``.

``--threads N`` sets the torch threads (1 by default, so that every ratio is measured at one
thread each); ``--warmup``, ``--rounds``, ``--steps`` and ``--repeats`` set how many samples
each median has. On one CPU thread the CT-sized volume dominates: the members' passes over
its 64 windows take about 12 s per member, so each repeat of k = 1, 2, 3 takes about 4
minutes, and the whole run about 15 minutes (the training part about 2, the memory part 1).
``--quick`` (32^3 volumes, a 3-level UNet with 8-32 channels, 1 timed step per round, a
128x128x40 CT volume, k = 1, 2, the memory of supervised and DCT-Seg only) checks the whole
path, not the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from profiles import (
    PROFILES,
    TUNED_DCT_SEG,
    TUNED_DUO_SEGNET,
    parse_method,
    split_cases,
    train_config,
)

from cotrain.checkpoint import publish_weights
from cotrain.config import TrainConfig
from cotrain.data import preprocessing
from cotrain.engine import Trainer, TrainState
from cotrain.inference import (
    EnsemblePredictor,
    labels_from_foreground,
    member_logits_sliding_window,
    soft_vote,
)
from cotrain.methods import METHOD_CLASSES, Batch
from cotrain.networks import Ensemble
from cotrain.streams import BatchStreams
from cotrain.synthetic import (
    CT_ORGANS,
    make_synthetic_case,
    write_synthetic_ct,
    write_synthetic_msd,
)

logger = logging.getLogger("bench.speed")

ROOT = Path(__file__).resolve().parents[1]
#: Where the results go by default: ``bench/results``.
RESULTS = Path(__file__).resolve().parent / "results"
#: Progress of the timed steps: every term of every method is active (ramps half way up).
PROGRESS = 0.5

#: What one run can measure (``--parts``), in the order it measures them.
PARTS = ("training", "memory", "inference", "server")
#: The targets of the issue this benchmark serves.
STEP_TARGETS = {"dct_seg": (3.0, 2.5), "duo_segnet": (1.8, None)}
END_TO_END_TARGET = 1.25  # k = 2 end to end / network, CT-sized volume
SCORING_TARGET = 1.1  # scoring / (preprocessing + network), CT-sized volume
TARGET_K = 2


@dataclass(frozen=True)
class Sizes:
    """What one run measures, and how often (the full sizes, or ``--quick``'s tiny ones).

    Attributes:
        profile: The quality benchmark's profile whose recipe and data the training steps use.
        train: ``TrainConfig`` settings replacing the profile's recipe (none: the recipe).
        synthetic_shape: Shape of the synthetic training volumes (when there is no hippocampus
            data, or always with ``quick``).
        num_labeled: Labeled training cases each method's streams load.
        num_unlabeled: Unlabeled training cases.
        use_shared_data: Train and segment the MR-sized volume on hippocampus cases if present.
        memory_steps: Steps of each method's memory measurement.
        memory_methods: The method specs whose memory is measured (none: every one).
        ct_shape: Shape of the CT-sized volume.
        ct_spacing: Its voxel size (mm).
        ct_config: ``TrainConfig`` settings of the CT-sized model.
        mr_shape: Shape of the synthetic MR-sized volume (when there is no hippocampus data).
        mr_network: Network of the MR-sized model (none: the quick recipe's).
        mr_roi: Window of the MR-sized model (none: the quick recipe's).
        members: Member counts k of the inference measurements.
        server_calls: Timed infer calls through the server (after one warm-up call).
    """

    profile: str = "quick"
    train: dict[str, Any] = field(default_factory=dict)
    synthetic_shape: tuple[int, int, int] = (36, 50, 35)
    num_labeled: int = 8
    num_unlabeled: int = 8
    use_shared_data: bool = True
    memory_steps: int = 3
    memory_methods: tuple[str, ...] | None = None
    ct_shape: tuple[int, int, int] = (512, 512, 160)
    ct_spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)
    ct_config: dict[str, Any] = field(
        default_factory=lambda: {
            "target_spacing": (1.5, 1.5, 2.0),
            "intensity": "ct:-1000,1000",
            "roi_size": (96, 96, 64),
            "network": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2]},
        }
    )
    mr_shape: tuple[int, int, int] = (36, 50, 35)
    mr_network: dict[str, Any] | None = None
    mr_roi: tuple[int, int, int] | None = None
    members: tuple[int, ...] = (1, 2, 3)
    server_calls: int = 5


TINY_NETWORK = {"channels": [8, 16, 32], "strides": [2, 2]}
FULL = Sizes()
QUICK = Sizes(
    train={
        "roi_size": (32, 32, 32),
        "batch_size": 1,
        "unlabeled_batch_size": 1,
        "network": TINY_NETWORK,
    },
    synthetic_shape=(32, 32, 32),
    num_labeled=2,
    num_unlabeled=2,
    use_shared_data=False,
    memory_steps=1,
    memory_methods=("supervised", "dct_seg"),  # a spawned process each: ~5 s of imports
    ct_shape=(128, 128, 40),
    ct_config={
        "target_spacing": (1.5, 1.5, 2.0),
        "intensity": "ct:-1000,1000",
        "roi_size": (32, 32, 32),
        "network": TINY_NETWORK,
    },
    mr_shape=(32, 32, 32),
    mr_network=TINY_NETWORK,
    mr_roi=(32, 32, 32),
    members=(1, 2),
    server_calls=2,
)


# ------------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``function()`` takes, with the device's work included, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    """The median, rounded to microseconds."""
    return round(statistics.median(values), 6)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` to 3 decimals, or ``None`` when either is missing or 0."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What ran the benchmark: device name, threads, versions, date and command line."""
    import monai

    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_count": multiprocessing.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        # How busy the machine was when the run started (other jobs slow every part alike
        # only roughly: read the ratios of a busy run with care).
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def rss_mb() -> float:
    """This process's resident memory now (MB), from ``/proc/self/statm``."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries a process's ``ru_maxrss`` over ``exec``, so in a spawned
    process it starts at the parent's resident memory when it forked; ``VmHWM`` is the peak of
    the process's own memory, and :func:`reset_peak_rss` can reset it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the resident memory now (Linux >= 4.0); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------ training
def method_specs(profile: str = "quick") -> list[str]:
    """Supervised first (every ratio's reference), then every other method, the tuned
    recipes, DCT-Seg's adversarial term amortised (``diversity_every``), both with the
    copy-paste term (``lambda_mix``: with and without the amortisation, and on every other
    step only, ``mix_every=2``), and supervised and tuned DCT-Seg with the members stacked
    (``stack_members``: whether vectorising the members pays on this device). For another
    profile: supervised, then that profile's own methods (``full``, supervised on more cases,
    steps as supervised does)."""
    if profile != "quick":
        methods = [m for m in PROFILES[profile].methods if m not in ("supervised", "full")]
        return ["supervised", *methods]
    names = ["supervised", *(name for name in METHOD_CLASSES if name != "supervised")]
    return [
        *names,
        TUNED_DCT_SEG,
        TUNED_DUO_SEGNET,
        f"{TUNED_DCT_SEG},diversity_every=2",
        f"{TUNED_DCT_SEG},lambda_mix=1.0",
        f"{TUNED_DCT_SEG},lambda_mix=1.0,diversity_every=4",
        f"{TUNED_DCT_SEG},lambda_mix=1.0,diversity_every=4,mix_every=2",
        f"{TUNED_DUO_SEGNET},lambda_mix=1.0",
        f"{TUNED_DUO_SEGNET},lambda_mix=1.0,mix_every=2",
        "supervised:stack_members=true",
        f"{TUNED_DCT_SEG},stack_members=true",
    ]


def training_cases(
    sizes: Sizes, work: Path
) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """Labeled and unlabeled training cases: the profile's data if present, else synthetic.

    Args:
        sizes: How many cases, and the synthetic shape.
        work: Where synthetic cases are written.

    Returns:
        ``(labeled, unlabeled, source)``; ``source`` names the data.
    """
    profile = PROFILES[sizes.profile]
    if sizes.use_shared_data and profile.data.is_dir():
        train = split_cases(profile)[2]
        labeled = train[: sizes.num_labeled]
        unlabeled = [
            {"image": c["image"]}
            for c in train[sizes.num_labeled : sizes.num_labeled + sizes.num_unlabeled]
        ]
        return labeled, unlabeled, str(profile.data)
    root = work / "train"
    count = sizes.num_labeled + sizes.num_unlabeled
    write_synthetic_msd(
        root, count, shape=sizes.synthetic_shape, num_classes=len(profile.labels) + 1
    )
    cases = [
        {
            "image": str(root / "imagesTr" / f"case_{i:03d}.nii.gz"),
            "label": str(root / "labelsTr" / f"case_{i:03d}.nii.gz"),
        }
        for i in range(count)
    ]
    labeled = cases[: sizes.num_labeled]
    unlabeled = [{"image": c["image"]} for c in cases[sizes.num_labeled :]]
    shape = "x".join(map(str, sizes.synthetic_shape))
    return labeled, unlabeled, f"synthetic {shape} (cotrain.synthetic)"


def spec_config(spec: str, sizes: Sizes) -> TrainConfig:
    """The profile's recipe for one method spec (with ``sizes.train`` over it).

    Args:
        spec: A method spec (:func:`profiles.parse_method`).
        sizes: The run's sizes (and the profile).
    """
    profile = PROFILES[sizes.profile]
    profile = dataclasses.replace(profile, train={**profile.train, **sizes.train, "num_workers": 0})
    name, params = parse_method(spec)
    return train_config(profile, name, params, seed=0)


def prepare_trainer(trainer: Trainer) -> BatchStreams:
    """Set ``trainer`` up as :meth:`cotrain.engine.Trainer.fit` does before its loop
    (:meth:`~cotrain.engine.Trainer.setup`); returns its batch streams."""
    return trainer.setup()[1]


def prefetch(
    streams: BatchStreams, count: int, device: torch.device
) -> tuple[list[Batch], list[float]]:
    """Draw ``count`` batches beforehand; returns them and the seconds each ``next_batch()``
    took (the data time, left out of the step time)."""
    batches, seconds = [], []
    for _ in range(count):
        elapsed, batch = timed(streams.next_batch, device)
        batches.append(batch)
        seconds.append(elapsed)
    return batches, seconds


@dataclass
class MethodTiming:
    """One method's trainer, its prefetched batches and its timings.

    Attributes:
        spec: The method spec.
        trainer: Its trainer, set up (:func:`prepare_trainer`).
        batches: Its batches, one per step.
        data_seconds: Seconds of each ``next_batch()``.
        step_seconds: Seconds of each timed ``train_step`` (not the warm-up ones).
        used: Steps taken (warm-up included): the next batch's index.
    """

    spec: str
    trainer: Trainer
    batches: list[Batch]
    data_seconds: list[float]
    step_seconds: list[float] = field(default_factory=list)
    used: int = 0

    def step(self) -> float:
        """One training step on the next prefetched batch; returns its seconds."""
        batch = self.batches[self.used % len(self.batches)]
        self.used += 1
        device = self.trainer.device
        elapsed, _ = timed(lambda: self.trainer.train_step(batch, PROGRESS), device)
        return elapsed


def time_training(
    specs: Sequence[str],
    sizes: Sizes,
    labeled: list[dict[str, str]],
    unlabeled: list[dict[str, str]],
    work: Path,
    device: torch.device,
    warmup: int,
    rounds: int,
    steps: int,
) -> list[dict[str, Any]]:
    """Time every method's training step, interleaved in rounds.

    Each method first takes ``warmup`` untimed steps; then in round ``r`` every method takes
    ``steps`` timed steps, starting from method ``r`` (a rotated order, so that no method is
    always first after another).

    Returns:
        One row per spec: median seconds per step, ratio to supervised, data seconds per step,
        and the samples.
    """
    timings = []
    for spec in specs:
        config = spec_config(spec, sizes)
        trainer = Trainer(
            config, labeled, unlabeled, work / "runs" / f"{len(timings)}", device=device
        )
        streams = prepare_trainer(trainer)
        batches, data_seconds = prefetch(streams, warmup + rounds * steps, device)
        timings.append(MethodTiming(spec, trainer, batches, data_seconds))
        logger.info("%s: set up, %d batches drawn", spec, len(batches))
    for timing in timings:
        for _ in range(warmup):
            timing.step()
    for r in range(rounds):
        for i in range(len(timings)):
            timing = timings[(r + i) % len(timings)]
            timing.step_seconds += [timing.step() for _ in range(steps)]
        logger.info("training round %d/%d done", r + 1, rounds)
    reference = median(timings[0].step_seconds)
    rows = []
    for timing in timings:
        seconds = median(timing.step_seconds)
        rows.append(
            {
                "method": timing.spec,
                "seconds_per_step": seconds,
                "ratio_to_supervised": ratio(seconds, reference),
                "data_seconds_per_step": median(timing.data_seconds),
                "steps_timed": len(timing.step_seconds),
                "step_seconds": [round(s, 6) for s in timing.step_seconds],
            }
        )
    return rows


def measure_memory(
    spec: str,
    config: TrainConfig,
    labeled: list[dict[str, str]],
    unlabeled: list[dict[str, str]],
    output: str,
    device: str,
    threads: int,
    steps: int,
) -> dict[str, Any]:
    """The peak memory of one method's training steps, measured alone.

    After the set-up (trainer, streams and ``steps`` batches drawn), ``steps`` training steps.
    On CUDA (in this process): ``torch.cuda.max_memory_allocated`` during the steps; ``step_mb``
    is its excess over what is allocated after the set-up (the step's own working set: the
    activations and gradients), ``total_mb`` the peak over what was allocated before the set-up
    (weights, optimiser state and batches included). On a CPU (meant to run in a spawned
    process of its own): the peak resident memory during the steps (:func:`peak_rss_mb`, reset
    after the set-up); ``step_mb`` is its excess over the resident memory after the set-up,
    ``total_mb`` the peak itself (the Python process, torch and MONAI included).

    Args:
        spec: The method spec (reported).
        config: Its configuration.
        labeled: Labeled cases.
        unlabeled: Unlabeled cases.
        output: The trainer's output folder.
        device: ``"cuda"`` or ``"cpu"``.
        threads: Torch threads.
        steps: Training steps measured.

    Returns:
        ``{"method", "step_mb", "total_mb", "setup_mb", "kind"}`` (and ``"ru_maxrss_mb"`` on
        a CPU, for reference).
    """
    torch.set_num_threads(threads)
    torch_device = torch.device(device)
    cuda = torch_device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(torch_device)
    trainer = Trainer(config, labeled, unlabeled, output, device=torch_device)
    streams = prepare_trainer(trainer)
    batches, _ = prefetch(streams, steps, torch_device)
    del streams
    gc.collect()
    if cuda:
        setup = torch.cuda.memory_allocated(torch_device) / 2**20
        torch.cuda.reset_peak_memory_stats(torch_device)
    else:
        setup = rss_mb()
        reset = reset_peak_rss()
    for batch in batches:
        trainer.train_step(batch, PROGRESS)
    synchronize(torch_device)
    if cuda:
        peak = torch.cuda.max_memory_allocated(torch_device) / 2**20
        result: dict[str, Any] = {
            "step_mb": peak - setup,
            "total_mb": peak - before / 2**20,
            "setup_mb": setup - before / 2**20,
            "kind": "cuda max_memory_allocated",
        }
        del trainer, batches
        gc.collect()
        torch.cuda.empty_cache()
    else:
        peak = peak_rss_mb()
        result = {
            "step_mb": peak - setup,
            "total_mb": peak,
            "setup_mb": setup,
            "kind": "cpu VmHWM (own spawned process)",
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if not reset:
            result["note"] = "VmHWM not reset: the peak may be the set-up's"
    return {
        "method": spec,
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()},
    }


def _memory_in_own_process(job: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`measure_memory` of one job tuple in a new spawned process.

    A pool of one process per job: a process that dies (out of memory, a failed import) raises
    ``BrokenProcessPool`` here instead of being replaced, as ``multiprocessing.Pool`` would,
    forever.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure_memory, *job).result()


def memory_of_methods(
    specs: Sequence[str],
    sizes: Sizes,
    labeled: list[dict[str, str]],
    unlabeled: list[dict[str, str]],
    work: Path,
    device: torch.device,
    threads: int,
    workers: int,
) -> list[dict[str, Any]]:
    """Every method's peak memory (:func:`measure_memory`), each measured alone.

    On CUDA one after the other in this process; on a CPU each in a new spawned process
    (``workers`` at a time: each process's own peak is unaffected by the others). Only
    ``sizes.memory_methods`` when it names some.
    """
    jobs = [
        (
            spec,
            spec_config(spec, sizes),
            labeled,
            unlabeled,
            str(work / "memory" / str(i)),
            device.type,
            threads,
            sizes.memory_steps,
        )
        for i, spec in enumerate(specs)
        if sizes.memory_methods is None or spec in sizes.memory_methods
    ]
    if device.type == "cuda":
        return [measure_memory(*job) for job in jobs]
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as threads:
        return list(threads.map(_memory_in_own_process, jobs))


# ------------------------------------------------------------------------------------ inference
def inference_volumes(
    sizes: Sizes, work: Path
) -> list[tuple[str, Path, TrainConfig, dict[str, Any]]]:
    """The MR-sized and the CT-sized volume (the cheap one first), each with its model's
    configuration (k = 1; :func:`random_predictor` sets k).

    Returns:
        ``(name, image path, config, description)`` per volume.
    """
    mr_config = spec_config("supervised", FULL)  # the quick recipe
    overrides: dict[str, Any] = {"members": 1}
    if sizes.mr_network is not None:
        overrides["network"] = sizes.mr_network
    if sizes.mr_roi is not None:
        overrides["roi_size"] = sizes.mr_roi
    mr_config = dataclasses.replace(mr_config, **overrides)
    profile = PROFILES["quick"]
    if sizes.use_shared_data and profile.data.is_dir():
        mr_path = Path(split_cases(profile)[0][0]["image"])
        source = str(mr_path)
    else:
        image, _ = make_synthetic_case(sizes.mr_shape, seed=0, num_classes=3)
        mr_path = work / "mr.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(mr_path))
        source = "synthetic (cotrain.synthetic)"
    mr_shape = list(nib.load(str(mr_path)).shape)

    ct_path, ct_label = work / "ct.nii.gz", work / "ct_label.nii.gz"
    start = time.monotonic()
    organs = write_synthetic_ct(ct_path, ct_label, sizes.ct_shape, sizes.ct_spacing)
    logger.info("wrote the CT-sized volume in %.1f s", time.monotonic() - start)
    ct_config = TrainConfig(
        method="supervised",
        members=1,
        labels={name: value for value, (name, *_) in CT_ORGANS.items()},
        **sizes.ct_config,
    )
    ct_description = {
        "shape": list(sizes.ct_shape),
        "spacing": list(sizes.ct_spacing),
        "dtype": "int16",
        "organ_voxels": organs,
        "source": "synthetic",
    }
    return [
        ("mr", mr_path, mr_config, {"shape": mr_shape, "source": source}),
        ("ct", ct_path, ct_config, ct_description),
    ]


def load_image(predictor: EnsemblePredictor, path: Path) -> MetaTensor:
    """The predictor's own preprocessing of ``path`` (its header and voxel checks included).

    ``EnsemblePredictor.load_image``, or ``_load_image`` where it still has its former private
    name.
    """
    loader = getattr(predictor, "load_image", None) or predictor._load_image
    return loader(path)


def random_predictor(config: TrainConfig, members: int, device: torch.device) -> EnsemblePredictor:
    """A ``members``-member predictor of ``config``'s network with random weights.

    Member ``i`` is initialised with seed ``i``, so the k-member ensemble holds the members of
    the (k - 1)-member one plus one.
    """
    config = dataclasses.replace(config, members=members)
    ensemble = Ensemble(
        members, config.spatial_dims, 1, config.num_classes, seed=0, network=config.network
    )
    return EnsemblePredictor(ensemble, config, device)


def time_inference(
    name: str,
    path: Path,
    config: TrainConfig,
    ks: Sequence[int],
    device: torch.device,
    repeats: int,
) -> list[dict[str, Any]]:
    """End to end, preprocessing, network and scoring of one volume with k members.

    Each repeat makes two calls, ``predict_file`` (end to end) and ``mean_disagreement``
    (scoring), and times the preprocessing (``load_image``) and the network
    (``member_logits``: without gradients, with autocast when the predictor would use it,
    the image moved to the device included) inside each call: a ratio compares parts of the
    same call, not separate calls whose network time varies by 10-20% on a shared CPU. The
    repeats are interleaved over k (repeat r: every k), after one warm-up window per k.

    Returns:
        One row per k: median seconds of each part, and the medians of the per-call ratios.
    """
    predictors = {k: random_predictor(config, k, device) for k in ks}
    for predictor in predictors.values():  # warm-up: one window
        with torch.no_grad():
            member_logits_sliding_window(
                predictor.ensemble,
                torch.zeros(1, 1, *config.roi_size, device=device),
                config.roi_size,
            )
    parts = ("end_to_end", "preprocessing", "network", "scoring", "scoring_network")
    samples: dict[int, dict[str, list[float]]] = {k: {part: [] for part in parts} for k in ks}
    for r in range(repeats):
        for k in ks:
            predictor, sample = predictors[k], samples[k]
            with timed_stages(predictor, device) as stages:
                elapsed, prediction = timed(lambda p=predictor: p.predict_file(path), device)
            sample["end_to_end"].append(elapsed)
            sample["preprocessing"].append(stages["load_image"])
            sample["network"].append(stages["member_logits"])
            with timed_stages(predictor, device) as stages:
                elapsed, _ = timed(lambda p=predictor: p.mean_disagreement(path), device)
            sample["scoring"].append(elapsed)
            sample["scoring_network"].append(stages["load_image"] + stages["member_logits"])
            logger.info(
                "%s k=%d repeat %d: end to end %.2f s, network %.2f s, scoring %.2f s",
                name,
                k,
                r + 1,
                sample["end_to_end"][-1],
                sample["network"][-1],
                sample["scoring"][-1],
            )
            del prediction
    rows = []
    for k in ks:
        sample = samples[k]
        m = {part: median(values) for part, values in sample.items()}
        rows.append(
            {
                "volume": name,
                "k": k,
                "end_to_end_s": m["end_to_end"],
                "preprocessing_s": m["preprocessing"],
                "network_s": m["network"],
                "scoring_s": m["scoring"],
                "end_to_end_over_network": median_ratio(sample["end_to_end"], sample["network"]),
                "scoring_over_preprocessing_and_network": median_ratio(
                    sample["scoring"], sample["scoring_network"]
                ),
                "preprocessed_shape": predictor_grid(predictors[k], path),
                "samples": {part: [round(v, 6) for v in values] for part, values in sample.items()},
            }
        )
    return rows


def time_label_back(
    predictor: EnsemblePredictor,
    image_path: Path,
    label_path: Path,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Seconds from the soft vote on the model's grid to the label on the image's grid, as
    ``predict_file`` takes it (``_to_image_grid(as_label=True)``: resampled back only where a
    foreground class can win) against resampling every voxel back, then the label.

    Two votes: the random members' (foreground everywhere: nothing to skip) and an organ-like
    one, the volume's own organs one-hot on the model's grid (what a trained model's confident
    vote looks like). Medians of ``repeats``.
    """
    image = predictor.load_image(image_path)
    with torch.no_grad():
        random_vote = soft_vote(predictor.member_logits(image))[0, 1:].cpu()
    truth = preprocessing(predictor.config)({"image": str(image_path), "label": str(label_path)})
    organs = truth["label"].as_tensor()[0].long()
    organ_vote = torch.nn.functional.one_hot(organs, predictor.config.num_classes)
    organ_vote = organ_vote.movedim(-1, 0)[1:].float()
    result: dict[str, Any] = {"organ_voxel_fraction": round(float((organs > 0).float().mean()), 4)}
    for name, vote in (("random", random_vote), ("organs", organ_vote)):
        box, every = [], []
        for _ in range(repeats):
            box.append(timed(lambda v=vote: predictor._to_image_grid(v, image, True), device)[0])
            every.append(
                timed(
                    lambda v=vote: labels_from_foreground(predictor._to_image_grid(v, image)),
                    device,
                )[0]
            )
        result[name] = {"label_s": median(box), "every_voxel_s": median(every)}
    return result


@contextlib.contextmanager
def timed_stages(predictor: EnsemblePredictor, device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in ``predictor.load_image`` and ``predictor.member_logits`` by the calls
    made inside the ``with`` block (each summed; the device's work included)."""
    seconds = {"load_image": 0.0, "member_logits": 0.0}
    for stage in seconds:
        # (``_load_image``: its former private name, when measuring an older commit)
        original = getattr(predictor, stage, None) or predictor._load_image

        def timed_stage(*args, _original=original, _stage=stage, **kwargs):
            elapsed, result = timed(lambda: _original(*args, **kwargs), device)
            seconds[_stage] += elapsed
            return result

        setattr(predictor, stage, timed_stage)
    try:
        yield seconds
    finally:
        for stage in seconds:
            delattr(predictor, stage)  # the class's method again


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The median of the per-call ratios, to 3 decimals."""
    ratios = [ratio(n, d) for n, d in zip(numerators, denominators, strict=True)]
    return None if None in ratios else round(statistics.median(ratios), 3)


def predictor_grid(predictor: EnsemblePredictor, path: Path) -> list[int]:
    """The spatial shape of ``path`` on the model's grid (what the network runs on)."""
    return list(load_image(predictor, path).shape[1:])


# ------------------------------------------------------------------------------------ server
def server_round_trip(
    config: TrainConfig,
    image: Path,
    work: Path,
    device: torch.device,
    threads: int,
    calls: int,
) -> dict[str, Any]:
    """``MONAILabelClient.infer`` through a real server against ``predict_file``.

    Publishes a 2-member model of ``config`` with random weights as the app's ``dct_seg``
    model, starts ``monailabel start_server`` with the app on a studies folder holding
    ``image`` (with the helpers ``bench/server_roundtrip.py`` uses, ``tests/app_helpers.py``),
    and times ``calls`` infer calls after a warm-up call (which loads the model), then as many
    ``predict_file`` calls of the same model on the same file in this process.

    Returns:
        The medians and their ratio; ``{"skipped": reason}`` when the server cannot start,
        ``{"failed": error, "server_log": its last lines}`` when an infer call fails.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from monailabel.client import MONAILabelClient

        from tests.app_helpers import NO_SCORING_ENV, MonaiLabelServer, copy_app
    except ImportError as error:
        return {"skipped": f"MONAI Label cannot be imported: {error}"}
    config = dataclasses.replace(config, method="dct_seg", members=2)
    app = copy_app(work / "app")
    model = app / "model" / "dct_seg.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    ensemble = Ensemble(
        2, config.spatial_dims, 1, config.num_classes, seed=0, network=config.network
    )
    publish_weights(model, config, ensemble, ensemble.state_dict(), TrainState())
    studies = work / "studies"
    studies.mkdir()
    image_id = "image_000"
    shutil.copy(image, studies / f"{image_id}.nii.gz")
    conf = {
        "models": "dct_seg",
        "labels": json.dumps(config.labels, separators=(",", ":")),
        "roi_size": json.dumps(list(config.roi_size)),
        "network": json.dumps(config.network, separators=(",", ":")),
        "intensity": config.intensity,
        "auto_train": "false",
    }
    threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    server = MonaiLabelServer(
        app, studies, conf, work / "server.log", env={**NO_SCORING_ENV, **threads_env}
    )
    try:
        server.start()
    except (RuntimeError, TimeoutError, OSError) as error:
        return {"skipped": f"the MONAI Label server did not start: {str(error)[-2000:]}"}
    try:
        (work / "client").mkdir()
        client = MONAILabelClient(server.url, tmpdir=str(work / "client"))
        params = {"device": device.type}
        client_seconds, server_totals = [], []
        for i in range(calls + 1):
            start = time.perf_counter()
            try:
                label_file, result = client.infer("dct_seg", image_id, params)
            except Exception as error:  # the client raises its own exception, or requests'
                return {"failed": f"infer: {error}", "server_log": server.log_tail(40)}
            elapsed = time.perf_counter() - start
            Path(label_file).unlink(missing_ok=True)
            if i:  # the first call loads the model
                client_seconds.append(elapsed)
                server_totals.append(float(result.get("latencies", {}).get("total", 0.0)))
    finally:
        server.stop()
    predictor = EnsemblePredictor.load(model, device=device)
    predictor.predict_file(image)  # warm-up
    library_seconds, write_seconds = [], []
    for _ in range(calls):
        elapsed, prediction = timed(lambda: predictor.predict_file(image), device)
        library_seconds.append(elapsed)
        start = time.perf_counter()
        predictor.write_prediction(prediction, work / "label.nii.gz")
        write_seconds.append(time.perf_counter() - start)
    client_s, library_s = median(client_seconds), median(library_seconds)
    return {
        "image": str(image),
        "calls": calls,
        "client_infer_s": client_s,
        "server_reported_total_s": median(server_totals),
        "library_predict_file_s": library_s,
        "library_write_s": median(write_seconds),
        "client_over_library": ratio(client_s, library_s),
        "samples": {
            "client_infer": [round(s, 6) for s in client_seconds],
            "server_reported_total": server_totals,
            "library_predict_file": [round(s, 6) for s in library_seconds],
        },
    }


# ------------------------------------------------------------------------------------ report
def target_lines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met."""
    targets = []
    for row in results.get("training", []):
        name, _ = parse_method(row["method"])
        if name not in STEP_TARGETS or row["ratio_to_supervised"] is None:
            continue
        limit, stretch = STEP_TARGETS[name]
        value = row["ratio_to_supervised"]
        targets.append(
            {
                "target": f"{row['method']} step <= {limit}x supervised",
                "value": value,
                "limit": limit,
                "met": value <= limit,
                **({"stretch": stretch, "stretch_met": value <= stretch} if stretch else {}),
            }
        )
    ct = {row["k"]: row for row in results.get("inference", []) if row["volume"] == "ct"}
    if TARGET_K in ct:
        row = ct[TARGET_K]
        for key, limit, what in (
            ("end_to_end_over_network", END_TO_END_TARGET, "end to end <= {}x network"),
            (
                "scoring_over_preprocessing_and_network",
                SCORING_TARGET,
                "scoring <= {}x (preprocessing + network)",
            ),
        ):
            value = row[key]
            targets.append(
                {
                    "target": f"CT-sized, k={TARGET_K}: " + what.format(limit),
                    "value": value,
                    "limit": limit,
                    "met": value is not None and value <= limit,
                }
            )
    return targets


def projected_run_lines(results: dict[str, Any]) -> list[str]:
    """For a profile other than quick: each method's projected hours per run of the profile
    (its training steps and their data, validation left out), one run at a time."""
    iterations = results["settings"]["iterations_per_run"]
    lines = [
        "",
        f"## Projected time per run ({iterations} iterations)",
        "",
        "(seconds per step + data seconds per step) x iterations; the validation passes and "
        "the final evaluation come on top.",
        "",
        "| method | hours per run |",
        "|---|---|",
    ]
    for row in results.get("training", []):
        hours = (row["seconds_per_step"] + row["data_seconds_per_step"]) * iterations / 3600
        lines.append(f"| {row['method']} | {hours:.1f} |")
    return lines


def _mb(value: float | None) -> str:
    """Megabytes in a table cell (``-`` when not measured)."""
    return "-" if value is None else f"{value:.0f}"


def training_lines(results: dict[str, Any]) -> list[str]:
    """The training step's table (with each method's memory when measured)."""
    machine, settings = results["machine"], results["settings"]
    memory_how = (
        "each method alone, `torch.cuda.max_memory_allocated`; step = the peak minus what is "
        "allocated after set-up, total = the peak from before the set-up"
        if machine["device"] == "cuda"
        else "each method in a spawned process of its own, peak resident memory (`VmHWM`, reset "
        "after set-up: `ru_maxrss` is carried over `exec` from the parent); step = the peak "
        "minus the resident memory after set-up, total = the process's peak"
    )
    lines = [
        "",
        "## Training step",
        "",
        f"Data: {results.get('training_data')}. Recipe: roi {settings['train_roi']}, batch "
        f"{settings['batch_size']} labeled + {settings['unlabeled_batch_size']} unlabeled, UNet "
        f"{settings['train_channels']}, 2 members, progress {PROGRESS}. Median of "
        f"{settings['rounds']} rounds x {settings['steps']} steps after {settings['warmup']} "
        "warm-up steps, the methods interleaved."
        + (
            f" Memory ({settings['memory_steps']} steps): {memory_how}."
            if "memory" in results
            else ""
        ),
        "",
        "| method | s/step | x supervised | data s/step | step MB | total MB |",
        "|---|---|---|---|---|---|",
    ]
    memory = {row["method"]: row for row in results.get("memory", [])}
    for row in results.get("training", []):
        mem = memory.get(row["method"], {})
        lines.append(
            f"| {row['method']} | {row['seconds_per_step']:.3f} | "
            f"{row['ratio_to_supervised']:.2f} | {row['data_seconds_per_step']:.3f} | "
            f"{_mb(mem.get('step_mb'))} | {_mb(mem.get('total_mb'))} |"
        )
    return lines


def inference_lines(results: dict[str, Any]) -> list[str]:
    """Auto-segment and scoring per volume and k, with the network's share."""
    settings = results["settings"]
    lines = [
        "",
        "## Auto-segment and scoring",
        "",
        f"Random weights; median of {settings['repeats']} repeats. End to end: `predict_file` "
        "(file to label on the image grid); scoring: `mean_disagreement`; preprocessing "
        "(`load_image`) and network (`member_logits`) are timed inside those calls, and each "
        "ratio is the median of the per-call ratios (parts of the same call).",
        "",
    ]
    for name, volume in results.get("volumes", {}).items():
        lines.append(
            f"- {name}: {'x'.join(map(str, volume['shape']))} ({volume['source']}), model "
            f"{volume['model']}"
        )
    lines += [
        "",
        "| volume | k | end to end s | preprocessing s | network s | scoring s | "
        "end to end / network | scoring / (pre + network) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results.get("inference", []):
        lines.append(
            f"| {row['volume']} | {row['k']} | {row['end_to_end_s']:.3f} | "
            f"{row['preprocessing_s']:.3f} | {row['network_s']:.3f} | {row['scoring_s']:.3f} | "
            f"{row['end_to_end_over_network']} | {row['scoring_over_preprocessing_and_network']} |"
        )
    back = results.get("label_back")
    if back:
        lines += [
            "",
            "Label back to the image grid (CT-sized, k = 2, after the network): as "
            "`predict_file` takes it, resampled back only where a foreground class can win, "
            "against every voxel resampled back, then the label. Random members' vote "
            f"{back['random']['label_s']:.3f} s (every voxel {back['random']['every_voxel_s']:.3f} s); "
            "an organ-like vote (the volume's own organs one-hot on the model's grid, "
            f"{100 * back['organ_voxel_fraction']:.1f}% of its voxels, as a trained model's "
            f"confident vote) {back['organs']['label_s']:.3f} s (every voxel "
            f"{back['organs']['every_voxel_s']:.3f} s).",
        ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The tables of a run (of the parts measured so far), with the machine and the targets."""
    machine, settings = results["machine"], results["settings"]
    profile = settings.get("profile", "quick")
    lines = [
        f"# Speed: {machine['device']}"
        + ("" if profile == "quick" else f", the {profile} profile's recipe")
        + (" (quick sizes)" if settings["quick"] else "")
        + ("" if results.get("complete") else " (incomplete: the run stopped early)"),
        "",
        f"{machine['device_name']}, {machine['torch_threads']} torch thread(s), torch "
        f"{machine['torch']}, {machine['date']}"
        + (
            f", load average {machine['load_average_1min']} at the start."
            if "load_average_1min" in machine
            else "."
        ),
        f"Command: `{machine['command']}`",
    ]
    parts = settings.get("parts", list(PARTS))
    if "training" in parts or "memory" in parts:
        lines += training_lines(results)
    if profile != "quick":
        return "\n".join(lines + projected_run_lines(results)) + "\n"
    if "inference" in parts:
        lines += inference_lines(results)
    server = results.get("server")
    if server is not None and server.get("skipped") == "--parts":
        return "\n".join(lines + target_markdown(results)) + "\n"
    lines += ["", "## Server round trip", ""]
    if server is None:
        lines.append("Not measured (the run stopped before).")
    elif "skipped" in server:
        lines.append(f"Skipped: {server['skipped']}")
    elif "failed" in server:
        lines.append(f"FAILED: {server['failed']}")
    else:
        lines += [
            f"{server['calls']} calls on {server['image']} (2-member model, random weights), "
            "after one warm-up call each.",
            "",
            "| client infer s | server's own total s | library predict_file s | "
            "client / library |",
            "|---|---|---|---|",
            f"| {server['client_infer_s']:.3f} | {server['server_reported_total_s']:.3f} | "
            f"{server['library_predict_file_s']:.3f} | {server['client_over_library']} |",
        ]
    return "\n".join(lines + target_markdown(results)) + "\n"


def target_markdown(results: dict[str, Any]) -> list[str]:
    """The targets section: each target met or missed, by its value."""
    lines = ["", "## Targets", ""]
    if results["settings"]["quick"]:
        lines += ["Quick sizes: not the targets' setting; shown to check the report only.", ""]
    for target in results.get("targets", []):
        met = "met" if target["met"] else "MISSED"
        stretch = ""
        if "stretch" in target:
            stretch = (
                f" (stretch {target['stretch']}x: {'met' if target['stretch_met'] else 'missed'})"
            )
        lines.append(f"- {target['target']}: {target['value']} -> {met}{stretch}")
    return lines


# ------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    """The command line's options (its help is this module's docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, help="timed steps per method and round (default 2)")
    parser.add_argument("--rounds", type=int, help="rounds over the methods (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per method first (default 2)")
    parser.add_argument("--repeats", type=int, help="repeats of each inference part (default 3)")
    parser.add_argument(
        "--memory-workers",
        type=int,
        default=2,
        help="CPU memory measurements run at the same time, each in its own process",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="quick",
        help="the quality profile whose recipe and data the training steps use; another than "
        "quick measures the training step only, with each run's projected hours",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the server round trip")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="measure only these (default: all); the files are then named after them, "
        "e.g. speed-cpu-inference.md, so a part re-measured after a change keeps the others",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure, write ``OUTPUT/speed-DEVICE[-quick].{json,md}`` and print the tables.

    Args:
        argv: The options (``sys.argv[1:]`` when ``None``).

    Returns:
        0 (bad options exit with 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for name in ("threads", "steps", "rounds", "repeats", "memory_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("monai", "cotrain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MONAI's sliding-window inferer indexes with a list (torch warns at every call).
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = dataclasses.replace(QUICK if args.quick else FULL, profile=args.profile)
    training_only = args.profile != "quick"
    if training_only and args.parts != list(PARTS) and args.parts != ["training"]:
        parser.error(f"--profile {args.profile} measures the training step only")
    parts = ["training"] if training_only else [p for p in PARTS if p in args.parts]
    if args.no_server and "server" in parts:
        parts.remove("server")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (1 if args.quick else 2)
    repeats = args.repeats or (2 if args.quick else 3)
    specs = method_specs(args.profile)
    reference = spec_config("supervised", sizes)
    results: dict[str, Any] = {
        "machine": machine_info(device, args.threads),
        "settings": {
            "quick": args.quick,
            "profile": args.profile,
            "parts": parts,
            "iterations_per_run": reference.epochs * reference.iterations_per_epoch,
            "warmup": warmup,
            "rounds": rounds,
            "steps": steps,
            "repeats": repeats,
            "train_roi": list(reference.roi_size),
            "batch_size": reference.batch_size,
            "unlabeled_batch_size": reference.unlabeled_batch_size,
            "train_channels": reference.network["channels"],
            "members": list(sizes.members),
            "memory_steps": sizes.memory_steps,
        },
    }
    started = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"speed-{device.type}{'' if args.profile == 'quick' else '-' + args.profile}"
    skipped = {"server"} if args.no_server else set()
    if not training_only and set(parts) | skipped != set(PARTS):
        name += "-" + "-".join(parts)
    name += "-quick" if args.quick else ""

    def save(complete: bool) -> str:
        """Write the JSON and the tables so far (after every part: a run stopped by a time
        limit keeps what it measured)."""
        results["complete"] = complete
        results["seconds"] = round(time.monotonic() - started, 1)
        results["targets"] = target_lines(results)
        (args.output / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        text = markdown(results)
        (args.output / f"{name}.md").write_text(text)
        return text

    def finish() -> int:
        """Write the complete results and print the tables."""
        print(save(True))
        print(f"wrote {args.output / name}.json and .md ({results['seconds']} s)")
        return 0

    with tempfile.TemporaryDirectory(prefix="cotrain-speed-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        if "training" in parts or "memory" in parts:
            labeled, unlabeled, source = training_cases(sizes, work)
            results["training_data"] = (
                f"{source}, {len(labeled)} labeled + {len(unlabeled)} unlabeled cases"
            )
        if "training" in parts:
            results["training"] = time_training(
                specs, sizes, labeled, unlabeled, work, device, warmup, rounds, steps
            )
            save(False)
        if "memory" in parts:
            logger.info("measuring memory")
            results["memory"] = memory_of_methods(
                specs, sizes, labeled, unlabeled, work, device, args.threads, args.memory_workers
            )
            save(False)
        if "inference" not in parts and "server" not in parts:
            return finish()
        results["volumes"] = {}
        volumes = inference_volumes(sizes, work)
        if "inference" in parts:
            results["inference"] = []
        for volume, path, config, description in volumes:
            description["model"] = (
                f"roi {list(config.roi_size)}, spacing {config.target_spacing}, "
                f"{config.intensity}, UNet {config.network['channels']}"
            )
            results["volumes"][volume] = description
            if "inference" in parts:
                results["inference"] += time_inference(
                    volume, path, config, sizes.members, device, repeats
                )
                if volume == "ct":
                    results["label_back"] = time_label_back(
                        random_predictor(config, 2, device),
                        path,
                        path.with_name("ct_label.nii.gz"),
                        device,
                        repeats,
                    )
                save(False)
        if "server" not in parts:
            results["server"] = {"skipped": "--no-server" if args.no_server else "--parts"}
        else:
            _, mr_path, mr_config, _ = next(v for v in volumes if v[0] == "mr")
            results["server"] = server_round_trip(
                mr_config, mr_path, work, device, args.threads, sizes.server_calls
            )
            server = results["server"]
            if "skipped" in server or "failed" in server:
                what = "skipped" if "skipped" in server else "failed"
                print(f"server round trip {what}: {server[what]}", file=sys.stderr)
            else:
                results["server"]["image"] = (
                    f"the MR-sized volume ({results['volumes']['mr']['source']})"
                )
    return finish()


if __name__ == "__main__":
    sys.exit(main())
