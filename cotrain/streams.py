"""The data streams of a training run: each member's labeled patches, the shared unlabeled
patches and, when asked, each member's perturbed copy of them, assembled into one
:class:`cotrain.methods.Batch` per step.

Each member draws from its own labeled subset (:func:`cotrain.schedules.split_labeled_subsets`;
every labeled case by default) with its own seed; the unlabeled pool is shared. Every process
of a distributed run draws its own patches (the seeds include the process rank).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from cotrain.config import TrainConfig
from cotrain.data import (
    RandomPatches,
    cache_volumes,
    infinite_batches,
    make_loader,
    training_transforms,
)
from cotrain.distributed import rank
from cotrain.methods import Batch
from cotrain.perturbation import UnlabeledPerturbation
from cotrain.schedules import split_labeled_subsets

logger = logging.getLogger(__name__)

__all__ = ["BatchStreams"]


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
            unlabeled_volumes, unlabeled_patches = cache_volumes(
                pool, training_transforms(c, labeled=False), c
            )
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

    def next_batch(self) -> Batch:
        """The next step's batch: every member's labeled patches, then the unlabeled ones."""
        labeled = []
        for batches in self._labeled:
            data = next(batches)
            labeled.append(
                (
                    data["image"].as_tensor().to(self.device),
                    data["label"].as_tensor().to(self.device),
                )
            )
        unlabeled, copies = None, None
        if self._unlabeled is not None:
            unlabeled = next(self._unlabeled)["image"].as_tensor().to(self.device)
            if self._perturbation is not None:
                copies = self._perturbation(unlabeled, self.config.members)
        return Batch(labeled=labeled, unlabeled=unlabeled, unlabeled_copies=copies)
