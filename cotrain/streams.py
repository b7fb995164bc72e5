"""The data streams of a training run: each member's labeled patches, the shared unlabeled
patches and, when asked, each member's perturbed copy of them, assembled into one
:class:`cotrain.methods.Batch` per step.

Each member draws from its own labeled subset (:func:`cotrain.schedules.split_labeled_subsets`;
every labeled case by default) with its own seed; the unlabeled pool is shared. Every process
of a distributed run draws its own patches (the seeds include the process rank).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import torch
from monai import transforms as mt

from cotrain.config import TrainConfig
from cotrain.data import (
    RandomPatches,
    cache_budget_bytes,
    cache_volumes,
    cached_bytes,
    infinite_batches,
    make_loader,
    split_deterministic,
    training_transforms,
)
from cotrain.distributed import rank
from cotrain.methods import Batch
from cotrain.perturbation import UnlabeledPerturbation
from cotrain.schedules import split_labeled_subsets

logger = logging.getLogger(__name__)

__all__ = ["BatchStreams", "fit_pool"]


def fit_pool(
    pool: list[dict[str, str]], transform: mt.Compose, budget_bytes: int, seed: str
) -> list[dict[str, str]]:
    """The unlabeled studies whose cached volumes fit in ``budget_bytes``: all of them, or a
    random subset (seeded, so a run is reproducible; the caller's seed changes with the label
    count, so retrains draw other studies and every study is used over time).

    The size of a cached volume is measured on two of them, and the largest is assumed for all.

    Args:
        pool: ``{"image"}`` per unlabeled study.
        transform: Their training transforms (the deterministic part is what is cached).
        budget_bytes: Memory left for them.
        seed: Seed of the subset.
    """
    if not pool:
        return pool
    rng = random.Random(seed)
    deterministic, _ = split_deterministic(transform)
    probes = rng.sample(pool, min(2, len(pool)))
    per_study = max(cached_bytes(deterministic(dict(study))) for study in probes)
    fits = budget_bytes // max(per_study, 1)
    if fits >= len(pool):
        return pool
    keep = max(1, int(fits))
    logger.info(
        "unlabeled studies: %d of %d fit the cache budget (%.2f GB left, %.1f MB each); "
        "this run draws from a random %d",
        keep,
        len(pool),
        budget_bytes / 2**30,
        per_study / 2**20,
        keep,
    )
    if budget_bytes < per_study:
        logger.warning(
            "the labeled volumes fill the cache budget (cache_gb): one unlabeled study is used"
        )
    return sorted(rng.sample(pool, keep), key=lambda study: study["image"])


class BatchStreams:
    """Endless batches for one training run.

    Args:
        config: The run's settings (members, patch and batch sizes, perturbation, seed).
        labeled: ``{"image", "label"}`` per labeled case.
        unlabeled: ``{"image"}`` per unlabeled case; when empty, the labeled images double as
            unlabeled data.
        uses_unlabeled: Whether the method draws unlabeled batches at all.
        device: Where the batches go.
    """

    def __init__(
        self,
        config: TrainConfig,
        labeled: Sequence[dict[str, str]],
        unlabeled: Sequence[dict[str, str]],
        uses_unlabeled: bool,
        device: torch.device,
    ) -> None:
        c = config
        self.config = config
        self.device = device
        #: Each member's labeled case indices.
        self.subsets = split_labeled_subsets(
            len(labeled), c.members, c.shared_fraction, seed=c.seed
        )
        # The labeled volumes are cached once; each member draws patches of its own subset.
        labeled_volumes, labeled_patches = cache_volumes(
            labeled, training_transforms(c, labeled=True), c
        )
        #: Each member's labeled patches (all drawn from one cache of the labeled volumes).
        self.member_patches = [
            RandomPatches(labeled_volumes, subset, labeled_patches) for subset in self.subsets
        ]
        self._labeled: list[Iterator[dict]] = [
            infinite_batches(
                make_loader(patches, c.batch_size, c, seed=c.seed + 101 * m + 1000 * rank())
            )
            for m, patches in enumerate(self.member_patches)
        ]
        self._unlabeled: Iterator[dict] | None = None
        self._perturbation: UnlabeledPerturbation | None = None
        if uses_unlabeled:
            pool = list(unlabeled)
            if not pool:
                logger.warning(
                    "no unlabeled images: the labeled images are used as unlabeled data too"
                )
                pool = [{"image": case["image"]} for case in labeled]
            unlabeled_transform = training_transforms(c, labeled=False)
            budget = cache_budget_bytes(c) - sum(
                cached_bytes(labeled_volumes[i]) for i in range(len(labeled_volumes))
            )
            pool = fit_pool(pool, unlabeled_transform, budget, seed=f"{c.seed}:{len(labeled)}")
            #: The unlabeled studies this run draws from (all of them when they fit the cache).
            self.unlabeled_pool = pool
            unlabeled_volumes, unlabeled_patches = cache_volumes(pool, unlabeled_transform, c)
            self._unlabeled_volumes = unlabeled_volumes
            self._unlabeled = infinite_batches(
                make_loader(
                    RandomPatches(unlabeled_volumes, range(len(pool)), unlabeled_patches),
                    c.unlabeled_batch_size,
                    c,
                    seed=c.seed + 7 + 1000 * rank(),
                )
            )
            if c.perturb_unlabeled:
                cutout = tuple(max(1, round(c.unlabeled_cutout * s)) for s in c.roi_size)
                self._perturbation = UnlabeledPerturbation(
                    c.spatial_dims,
                    seed=c.seed + 13 + 1000 * rank(),
                    cutout_size=cutout if c.unlabeled_cutout else None,
                )

    def next_batch(self, unlabeled: bool = True) -> Batch:
        """The next step's batch: every member's labeled patches, then the unlabeled ones.

        Args:
            unlabeled: Draw the unlabeled patches (not in a supervised warm-up step).
        """
        labeled = []
        for batches in self._labeled:
            data = next(batches)
            labeled.append(
                (
                    data["image"].as_tensor().to(self.device),
                    data["label"].as_tensor().to(self.device),
                )
            )
        images, copies = None, None
        if unlabeled and self._unlabeled is not None:
            images = next(self._unlabeled)["image"].as_tensor().to(self.device)
            if self._perturbation is not None:
                copies = self._perturbation(images, self.config.members)
        return Batch(labeled=labeled, unlabeled=images, unlabeled_copies=copies)
