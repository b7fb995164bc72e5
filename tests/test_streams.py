"""The training batches: labeled volumes cached once, each member its own random patches."""

from __future__ import annotations

import torch

from cotrain.data import list_msd_cases
from cotrain.streams import BatchStreams
from tests.conftest import tiny_config


def _streams(cases: list[dict[str, str]], seed: int = 0) -> BatchStreams:
    config = tiny_config(method="dct_seg", members=3, seed=seed, roi_size=(16, 16, 16))
    unlabeled = [{"image": c["image"]} for c in cases[4:8]]
    return BatchStreams(config, cases[:4], unlabeled, True, torch.device("cpu"))


def test_members_share_one_cache_and_draw_their_own_patches(synthetic_cases) -> None:
    streams = _streams(synthetic_cases)
    volumes = {id(patches.volumes) for patches in streams.member_patches}
    assert len(volumes) == 1  # one copy of the labeled volumes in memory, not one per member
    assert len(streams.member_patches[0].volumes) == 4

    batches = [streams.next_batch() for _ in range(3)]
    again = _streams(synthetic_cases)
    for batch in batches:
        repeated = again.next_batch()
        for (image, label), (image2, label2) in zip(batch.labeled, repeated.labeled, strict=True):
            assert torch.equal(image, image2) and torch.equal(label, label2)  # reproducible
        assert batch.unlabeled.shape == (2, 1, 16, 16, 16)
    # Each member has its own random stream (not torch's global one): their patches differ,
    # although all three draw from the same four cases.
    for batch in batches:
        images = [image for image, _ in batch.labeled]
        assert not any(torch.equal(images[a], images[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    other_seed = _streams(synthetic_cases, seed=1).next_batch()
    assert not torch.equal(other_seed.labeled[0][0], batches[0].labeled[0][0])


def test_crop_centres_are_cached_and_every_class_gets_its_share(tmp_path) -> None:
    """A tiny second class is still the centre of about a quarter of the labeled patches
    (half foreground, in equal shares per class), from centres found once per volume."""
    import nibabel as nib
    import numpy as np

    from cotrain.data import CLASS_INDICES, cache_volumes, training_transforms

    label = np.zeros((48, 48, 48), np.uint8)
    label[4:24, 4:24, 4:24] = 1  # a large organ
    label[40:43, 40:43, 40:43] = 2  # a 27-voxel lesion
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "label.nii.gz"))
    case = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    config = tiny_config(labels={"organ": 1, "lesion": 2}, roi_size=(8, 8, 8))

    volumes, patches = cache_volumes([case], training_transforms(config, labeled=True), config)
    centres = volumes[0][f"label{CLASS_INDICES}"]
    assert [len(c) for c in centres[1:]] == [20**3, 27]  # below the cap: every voxel kept
    patches.set_random_state(0)
    with_lesion = 0
    for _ in range(200):
        patch = patches(dict(volumes[0]))[0]
        assert f"label{CLASS_INDICES}" not in patch  # the batch holds images and labels only
        with_lesion += bool((patch["label"] == 2).any())
    assert 30 <= with_lesion <= 75  # about 50 of 200


def test_a_cache_budget_bounds_the_unlabeled_pool_and_every_study_gets_used(tmp_path) -> None:
    """A folder of 40 studies with room for about 10: each run caches at most what fits, the
    labeled volumes always, and as labels are added the runs draw other studies, so none is
    left out for good (the CI-sized check of the memory bound)."""
    from cotrain.data import cache_budget_bytes, cache_volumes, cached_bytes, training_transforms
    from cotrain.streams import fit_pool
    from cotrain.synthetic import write_synthetic_msd

    write_synthetic_msd(tmp_path, 44, shape=(16, 16, 16))
    cases = list_msd_cases(tmp_path)
    labeled, pool = cases[:4], [{"image": c["image"]} for c in cases[4:]]
    per_study = 16**3 * 4  # one float32 channel
    config = tiny_config(method="dct_seg", roi_size=(16, 16, 16))
    volumes, _ = cache_volumes(labeled, training_transforms(config, labeled=True), config)
    labeled_size = sum(cached_bytes(v) for v in volumes)
    # image float32 + label uint8 + crop centres (int64; every voxel below the 10000 cap)
    assert labeled_size <= 4 * 16**3 * (4 + 1 + 8)
    budget_gb = (labeled_size + 10.5 * per_study) / 2**30  # the labeled volumes and 10 more
    config = tiny_config(method="dct_seg", roi_size=(16, 16, 16), cache_gb=budget_gb)
    streams = BatchStreams(config, labeled, pool, True, torch.device("cpu"))
    assert len(streams.unlabeled_pool) == 10
    labeled_bytes = sum(cached_bytes(v) for v in streams.member_patches[0].volumes)
    unlabeled_bytes = sum(cached_bytes(v) for v in streams._unlabeled_volumes)
    assert labeled_bytes + unlabeled_bytes <= cache_budget_bytes(config)
    assert streams.next_batch().unlabeled.shape[0] == config.unlabeled_batch_size

    transform = training_transforms(config, labeled=False)
    used: set[str] = set()
    for num_labeled in range(4, 34):  # retrains as labels arrive: another subset each time
        chosen = fit_pool(pool, transform, 10 * per_study, seed=f"0:{num_labeled}")
        assert len(chosen) == 10
        used |= {study["image"] for study in chosen}
    assert used == {study["image"] for study in pool}
    assert fit_pool(pool, transform, 100 * per_study, seed="0:4") == pool  # all fit: all used
