"""What the three datamodules share: the root and its synthetic demo data, the DataLoaders, the predict folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from swin.data import shapes
from swin.data.io import PredictFolder
from swin.data.samplers import EpochSampler, SeededSamples
from swin.data.transforms import seed_worker_transforms


class SwinDataModule(LightningDataModule):
    """A datamodule whose ``setup`` fills ``self.datasets`` with "train", "val", "predict" (and maybe "test").

    Every dataset yields dict samples: ``image`` plus ``label`` (classification), ``target`` (detection) or ``mask``
    (segmentation), and ``path``; predict samples are ``image``, ``path`` and ``size`` (the file's H, W). The test
    loader reads "test" when ``setup`` made one, else "val". Under a distributed strategy, validation and test split
    their images over the ranks without repeating any (rank r reads images r, r + W, r + 2W, ...; ranks differ by at
    most one image), so their metrics equal a single-device evaluation on any split; Lightning's own
    ``DistributedSampler`` would pad an uneven split with repeated images. Subclasses say how batches are collated
    (``collate_fn``), whether the last incomplete training batch is dropped (``drop_last``) and how their synthetic
    demo data is written (``write_synthetic``).

    Args:
        root: dataset folder.
        batch_size: images per device and training step.
        num_workers: DataLoader worker processes.
        eval_batch_size: images per device in validation, test and predict (default: ``batch_size``).
        predict_root: folder of images for ``predict`` (searched recursively).
        synthetic: write the deterministic "shapes" demo data in this layout into ``root`` when ``root`` is missing
            (atomically, on first use); an existing root is used as it is.
        synthetic_kwargs: arguments of that writer (``num_train``, ``num_val``, ``image_size``, ``seed``; see
            :mod:`swin.data.shapes`).
        persistent_workers: keep the loader worker processes alive between epochs (no new processes, no copy of
            the dataset each epoch); used only with ``num_workers`` > 0.
        pin_memory: page-locked batches for faster, asynchronous host-to-GPU copies; None: on when CUDA is there.
        prefetch_factor: batches each worker loads ahead (PyTorch's default 2; more smooths slow images at the
            cost of shared memory); used only with ``num_workers`` > 0.
    """

    drop_last: bool = True
    #: the :mod:`swin.data.shapes` writer of this layout (``writer(root, **synthetic_kwargs)``)
    write_synthetic: Callable[..., None] | None = None

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int,
        eval_batch_size: int | None = None,
        predict_root: str | None = None,
        synthetic: bool = False,
        synthetic_kwargs: dict[str, Any] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__()
        if prefetch_factor < 1:
            raise ValueError(f"{type(self).__name__}: prefetch_factor must be at least 1, got {prefetch_factor}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.predict_root = Path(predict_root) if predict_root else None
        self.synthetic = synthetic
        self.synthetic_kwargs = dict(synthetic_kwargs or {})
        self.loader_kwargs = dict(persistent_workers=persistent_workers, pin_memory=pin_memory,
                                  prefetch_factor=prefetch_factor)  # fmt: skip
        self.datasets: dict[str, Dataset] = {}

    # -- data on disk ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic data when asked and ``root`` is missing; every rank may call it (atomic rename)."""
        if self.synthetic:
            if self.write_synthetic is None:
                raise ValueError(f"{type(self).__name__} has no synthetic demo data: set data.synthetic false")
            shapes.ensure(self.root, self.write_synthetic, **self.synthetic_kwargs)

    def predict_dataset(self, transform: Callable[..., dict[str, Any]], default: Path | None = None) -> PredictFolder:
        """The images under ``predict_root`` (else ``default``) through the evaluation ``transform``."""
        folder = self.predict_root or default
        if folder is None:
            raise ValueError(f"predict needs a folder of images: set data.predict_root ({type(self).__name__})")
        return PredictFolder(folder, transform)

    # -- loaders --------------------------------------------------------------------------------------------------
    def collate_fn(self, train: bool) -> Callable | None:
        """How samples become a batch (None: PyTorch's default collation)."""
        return None

    def train_sampler(self, ranks: dict[str, int], seed: int) -> EpochSampler:
        """The training loader's sampler over this process's share (``ranks``: ``num_replicas``, ``rank``)."""
        return EpochSampler(len(self.datasets["train"]), seed=seed, **ranks)

    def _eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """The unrepeated split of ``dataset`` over the ranks under a distributed strategy, else None (Lightning keeps a
        sampler that is a ``DistributedSampler``)."""
        trainer = getattr(self, "trainer", None)
        ranks = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not ranks or ranks["num_replicas"] == 1:
            return None
        if len(dataset) < ranks["num_replicas"]:
            raise ValueError(
                f"{type(self).__name__}: {len(dataset)} evaluation images cannot be split over "
                f"{ranks['num_replicas']} ranks (every rank needs one)"
            )
        return UnrepeatedDistributedSampler(dataset, num_replicas=ranks["num_replicas"], rank=ranks["rank"], shuffle=False)

    def dataloader_settings(self) -> dict[str, Any]:
        """The DataLoader arguments set from ``persistent_workers``, ``pin_memory`` and ``prefetch_factor``."""
        workers = self.num_workers > 0
        pin = self.loader_kwargs["pin_memory"]
        return {
            "persistent_workers": workers and self.loader_kwargs["persistent_workers"],
            "pin_memory": torch.cuda.is_available() if pin is None else pin,
            "prefetch_factor": self.loader_kwargs["prefetch_factor"] if workers else None,
        }

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[split]
        if train:
            if self.drop_last:
                self._check_enough_for_a_batch(len(dataset))
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            trainer = getattr(self, "trainer", None)
            sampler = self.train_sampler(
                (trainer.distributed_sampler_kwargs if trainer is not None else None) or {"num_replicas": 1, "rank": 0},
                seed,
            )
            dataset = SeededSamples(dataset, seed)
        else:
            sampler = None if split == "predict" else self._eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(train),
            worker_init_fn=seed_worker_transforms,
            **self.dataloader_settings(),
        )

    def _check_enough_for_a_batch(self, size: int) -> None:
        """Training drops the last incomplete batch: each process needs ``batch_size`` images or it gets none."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        if size // processes < self.batch_size:
            raise ValueError(
                f"the training split under {self.root} has {size} usable images, fewer than batch_size "
                f"{self.batch_size} x {processes} process(es): every batch would be dropped (the last incomplete "
                f"batch is, see {type(self).__name__}); lower data.batch_size or add images"
            )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
