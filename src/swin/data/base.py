"""The DataLoader plumbing the three datamodules share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from swin.data.transforms import seed_worker_transforms


class SwinDataModule(LightningDataModule):
    """A datamodule whose ``setup`` fills ``self.datasets`` with "train", "val", "predict" (and maybe "test").

    The test loader reads "test" when ``setup`` made one, else "val". Subclasses say how batches are collated
    (``collate_fn``) and whether the last incomplete training batch is dropped (``drop_last``).

    Args:
        batch_size: images per device and training step.
        num_workers: DataLoader worker processes.
        eval_batch_size: images per device in validation, test and predict (default: ``batch_size``).
    """

    drop_last: bool = True

    def __init__(self, batch_size: int, num_workers: int, eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def collate_fn(self, train: bool) -> Callable | None:
        """How samples become a batch (None: PyTorch's default collation)."""
        return None

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(train),
            worker_init_fn=seed_worker_transforms,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
