from collections import Counter

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from swin.data import shapes
from swin.data.imagenet import ImageNetDataModule
from swin.data.samplers import ClassBalancedSampler

LABELS = [0] * 90 + [1] * 9 + [2] * 1  # 90 / 9 / 1


def test_each_class_is_drawn_about_equally_often():
    sampler = ClassBalancedSampler(LABELS, seed=3)
    counts = Counter(LABELS[i] for _ in range(20) for i in sampler)
    assert len(sampler) == 100 and sum(counts.values()) == 2000
    assert all(abs(counts[c] / 2000 - 1 / 3) < 0.05 for c in range(3)), counts  # shuffling gives 0.90 / 0.09 / 0.01


def test_passes_differ_but_are_the_same_on_every_process():
    a, b = ClassBalancedSampler(LABELS, seed=3), ClassBalancedSampler(LABELS, seed=3)
    first, second = list(a), list(a)
    assert first != second and [list(b), list(b)] == [first, second]
    assert list(ClassBalancedSampler(LABELS, seed=4)) != first


def test_under_ddp_the_ranks_split_one_draw():
    """Lightning wraps a custom sampler in DistributedSamplerWrapper: two ranks together take each drawn index once."""
    ranks = [DistributedSamplerWrapper(ClassBalancedSampler(LABELS, seed=3), num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        parts = [list(sampler) for sampler in ranks]
        assert len(parts[0]) == len(parts[1]) == 50
        assert Counter(parts[0] + parts[1]) == Counter(_draw(epoch))


def _draw(k: int) -> list[int]:
    sampler = ClassBalancedSampler(LABELS, seed=3)
    for _ in range(k):
        list(sampler)
    return list(sampler)


def test_imagenet_datamodule_uses_it_when_balanced(tmp_path):
    shapes.write_imagefolder(tmp_path, num_train=2, num_val=1, image_size=32)
    data = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0, balanced=True)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler) and loader.sampler.labels.tolist() == data.datasets["train"].labels
    plain = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    plain.setup("fit")
    assert isinstance(plain.train_dataloader().sampler, torch.utils.data.RandomSampler)
