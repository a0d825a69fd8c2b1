from collections import Counter

import pytest
import torch

from swin.data import shapes
from swin.data.imagenet import ImageNetDataModule
from swin.data.samplers import ClassBalancedSampler, EpochSampler, SeededSamples

LABELS = [0] * 90 + [1] * 9 + [2] * 1  # 90 / 9 / 1


def indices(sampler, epoch: int = 0) -> list[int]:
    sampler.set_epoch(epoch)
    keys = list(sampler)
    assert all(e == epoch for e, _ in keys)
    return [i for _, i in keys]


def test_each_class_is_drawn_about_equally_often():
    sampler = ClassBalancedSampler(LABELS, seed=3)
    counts = Counter(LABELS[i] for epoch in range(20) for i in indices(sampler, epoch))
    assert len(sampler) == 100 and sum(counts.values()) == 2000
    assert all(abs(counts[c] / 2000 - 1 / 3) < 0.05 for c in range(3)), counts  # shuffling gives 0.90 / 0.09 / 0.01


@pytest.mark.parametrize("make", [lambda **kw: EpochSampler(100, **kw), lambda **kw: ClassBalancedSampler(LABELS, **kw)])
def test_epochs_differ_but_each_is_a_function_of_seed_and_epoch(make):
    a, b = make(seed=3), make(seed=3)
    first, second = indices(a, 0), indices(a, 1)
    assert first != second and [indices(b, 0), indices(b, 1)] == [first, second]
    assert indices(b, 0) == first  # no hidden state: epoch 0 again is epoch 0
    assert indices(make(seed=4), 0) != first


def test_epoch_sampler_is_a_permutation_split_over_the_ranks_as_distributed_sampler_does():
    for size, ranks in ((100, 1), (101, 2), (7, 3)):
        reference = [torch.utils.data.DistributedSampler(range(size), ranks, r, shuffle=True, seed=5) for r in range(ranks)]
        ours = [EpochSampler(size, ranks, r, seed=5) for r in range(ranks)]
        for epoch in (0, 2):
            for sampler in reference:
                sampler.set_epoch(epoch)
            assert [indices(s, epoch) for s in ours] == [list(s) for s in reference]
            assert set().union(*map(set, (indices(s, epoch) for s in ours))) == set(range(size))


@pytest.mark.parametrize("ranks", [1, 2])
def test_start_skips_this_ranks_first_indices_once(ranks):
    """A resume part-way: the rest of the epoch on every rank, then whole epochs again."""
    samplers = [ClassBalancedSampler(LABELS, ranks, r, seed=1) for r in range(ranks)]
    for sampler in samplers:
        whole = indices(sampler, 4)
        sampler.start = 12
        assert indices(sampler, 4) == whole[12:]
        assert indices(sampler, 4) == whole


def test_seeded_samples_draw_augmentations_from_epoch_and_index(tmp_path):
    shapes.write_imagefolder(tmp_path, num_train=2, num_val=1, image_size=48)
    data = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    data.setup("fit")
    samples = SeededSamples(data.datasets["train"], seed=7)
    first = samples[(0, 3)]["image"]
    samples[(0, 1)]  # another sample in between changes nothing
    assert torch.equal(samples[(0, 3)]["image"], first)
    assert not torch.equal(samples[(1, 3)]["image"], first)  # another epoch, another crop
    assert not torch.equal(SeededSamples(data.datasets["train"], seed=8)[(0, 3)]["image"], first)


def test_datamodule_uses_them_under_the_global_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    shapes.write_imagefolder(tmp_path, num_train=2, num_val=1, image_size=32)
    data = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0, balanced=True)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler) and loader.sampler.labels.tolist() == data.datasets["train"].labels
    assert loader.sampler.seed == 11 and isinstance(loader.dataset, SeededSamples) and loader.dataset.seed == 11
    plain = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    plain.setup("fit")
    sampler = plain.train_dataloader().sampler
    assert type(sampler) is EpochSampler and len(sampler) == len(plain.datasets["train"])
