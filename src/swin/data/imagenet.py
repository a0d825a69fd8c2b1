"""ImageNet (or any ImageFolder tree) for classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from swin.data import shapes
from swin.data.base import SwinDataModule
from swin.data.io import IMAGE_EXTENSIONS, list_images, read_image
from swin.data.samplers import ClassBalancedSampler, EpochSampler
from swin.data.transforms import CROP_PCT, classification_transforms, interpolation_flag

EXTENSIONS = " ".join(IMAGE_EXTENSIONS)

def _layout_help(root: Path, splits: Sequence[str]) -> str:
    lines = [f"  {root}/"] + [f"    {split}/<class>/<image>.JPEG" for split in splits]
    return f"expected the ImageFolder layout ({EXTENSIONS}, any case):\n" + "\n".join(lines)


class ImageFolderDataset(Dataset):
    """Labelled images: samples ``{"image": the transform's CHW float tensor, "label": int, "path": str}``."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable[..., dict[str, Any]]):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = self.transform(image=read_image(path))["image"]
        return {"image": image, "label": self.labels[index], "path": str(path)}


class ImageNetDataModule(SwinDataModule):
    """ImageNet in the ImageFolder layout: ``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``.

    Classes are the sorted folder names of the train split; the val split must hold the same folders. Files
    are found recursively inside each class folder; only image files (:data:`swin.data.io.IMAGE_EXTENSIONS`, any
    case) count, other files and hidden folders are ignored, and a class folder without images is an error. A
    missing root or split is an error that shows the expected layout. A corrupt or unreadable image stops the run
    with an error naming the file (raised where the image is decoded, so it also surfaces from DataLoader workers);
    it is never skipped. The test split is the val split; ``predict_root`` is any folder of images, searched
    recursively. Samples are dicts: ``image``, ``label``, ``path`` (predict: ``image``, ``path``, ``size``).

    With ``synthetic=True`` a missing ``root`` is first filled with the deterministic "shapes" demo data
    (:func:`swin.data.shapes.write_imagefolder` with ``synthetic_kwargs``: ``num_train`` and ``num_val`` images
    per class, ``image_size``, ``seed``), on the first access of ``num_classes``/``class_names`` or in
    ``prepare_data``.

    Args:
        root: dataset folder.
        image_size: training crop and evaluation size.
        batch_size: images per device and step.
        num_workers: DataLoader worker processes.
        predict_root: folder of images for ``predict``.
        randaugment: RandAugment rand-m9-mstd0.5-inc1 in training.
        color_jitter: colour-jitter strength in training (timm skips it while RandAugment is on).
        random_erasing: random-erasing probability in training.
        crop_scale: range of the area fraction kept by the training RandomResizedCrop.
        crop_ratio: range of the aspect ratio (width / height) of the training RandomResizedCrop.
        hflip: horizontal-flip probability in training (0 for text, digits, symbols, many medical images).
        vflip: vertical-flip probability in training (e.g. 0.5 for aerial or microscope images).
        crop_pct: evaluation crop fraction: the shorter side is resized to ``image_size / crop_pct``, then centre
            cropped (0.875 in the recipe; 1.0 keeps the whole image).
        balanced: draw the training images class-balanced (:class:`~swin.data.samplers.ClassBalancedSampler`:
            every class equally often, with replacement) instead of shuffling them, for imbalanced datasets.
        interpolation: resizing filter, ``bicubic`` (the recipe), ``bilinear``, ``nearest`` or ``area``.
        train_split: folder of the training split under ``root``.
        val_split: folder of the validation (and test) split under ``root``.
        synthetic: write the shapes demo data into ``root`` if it is missing.
        synthetic_kwargs: arguments of :func:`swin.data.shapes.write_imagefolder`.
        persistent_workers: keep the loader workers alive between epochs (with ``num_workers`` > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies; None: on when CUDA is there.
        prefetch_factor: batches each loader worker loads ahead (with ``num_workers`` > 0).
    """

    write_synthetic = staticmethod(shapes.write_imagefolder)

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        predict_root: str | None = None,
        randaugment: bool = True,
        color_jitter: float = 0.4,
        random_erasing: float = 0.25,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        crop_pct: float = CROP_PCT,
        interpolation: str = "bicubic",
        balanced: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        synthetic: bool = False,
        synthetic_kwargs: dict[str, Any] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(root, batch_size, num_workers, None, predict_root, synthetic, synthetic_kwargs,
                         persistent_workers=persistent_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
        self.image_size = image_size
        self.augment = dict(
            randaugment=randaugment, color_jitter=color_jitter, random_erasing=random_erasing,
            crop_scale=tuple(crop_scale), crop_ratio=tuple(crop_ratio), hflip=hflip, vflip=vflip,
        )  # fmt: skip
        self.resize = dict(crop_pct=crop_pct, interpolation=interpolation)
        interpolation_flag(interpolation)  # an unknown name fails here, not in a worker
        self.balanced = balanced
        self.train_split = train_split
        self.val_split = val_split
        self._classes: list[str] | None = None

    def _split_dir(self, split: str) -> Path:
        folder = self.root / split
        if not folder.is_dir():
            what = f"root {self.root} does not exist" if not self.root.is_dir() else f"{folder} is not a folder"
            raise FileNotFoundError(f"{what}; {_layout_help(self.root, (self.train_split, self.val_split))}")
        return folder

    def _class_folders(self, split: str) -> list[str]:
        return sorted(p.name for p in self._split_dir(split).iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names of the train split."""
        if self._classes is None:
            self.prepare_data()
            classes = self._class_folders(self.train_split)
            if not classes:
                loose = list_images(self.root / self.train_split)
                found = f"{len(loose)} images lie directly in it (each class needs a folder of its own); " if loose else ""
                raise FileNotFoundError(
                    f"no class folders in {self.root / self.train_split}; {found}"
                    f"{_layout_help(self.root, (self.train_split, self.val_split))}"
                )
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split_dataset(self, split: str, train: bool) -> ImageFolderDataset:
        classes = self.class_names
        found = self._class_folders(split)
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise ValueError(
                f"class folders of {self.root / split} differ from those of {self.root / self.train_split}: "
                f"missing {missing}, extra {extra}"
            )
        paths, labels = [], []
        for label, name in enumerate(classes):
            images = list_images(self.root / split / name)
            if not images:
                raise FileNotFoundError(f"no images ({EXTENSIONS}, any case) in class folder {self.root / split / name}")
            paths += images
            labels += [label] * len(images)
        return ImageFolderDataset(paths, labels, self._transform(train))

    def _transform(self, train: bool) -> Callable[..., dict[str, Any]]:
        return classification_transforms(self.image_size, train=train, **self.augment, **self.resize)

    def train_sampler(self, ranks: dict[str, int], seed: int) -> EpochSampler:
        if not self.balanced:
            return super().train_sampler(ranks, seed)
        return ClassBalancedSampler(self.datasets["train"].labels, seed=seed, **ranks)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._split_dataset(self.train_split, train=True)
        if stage in ("fit", "validate", "test"):
            self.datasets["val"] = self._split_dataset(self.val_split, train=False)
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset(self._transform(train=False))
