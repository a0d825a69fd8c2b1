"""ImageNet (or any ImageFolder tree) for classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from swin.data import shapes
from swin.data.base import SwinDataModule
from swin.data.transforms import classification_transforms

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def is_image_file(path: Path) -> bool:
    """A file whose extension is one of :data:`IMAGE_EXTENSIONS`, in any case (.JPEG, .jpg, .PNG ...)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); other files are ignored."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file into an H×W×3 uint8 RGB array; an unreadable file raises an error naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's errors for bad files
        raise RuntimeError(f"cannot read image {path}: {error}") from error


def _layout_help(root: Path, splits: Sequence[str]) -> str:
    lines = [f"  {root}/"] + [f"    {split}/<class>/<image>.JPEG" for split in splits]
    return "expected the ImageFolder layout (.JPEG .jpg .jpeg .png):\n" + "\n".join(lines)


class ImageFolderDataset(Dataset):
    """Images with integer labels, or with their paths when ``labels`` is None (prediction).

    Items are ``(image, label)`` or ``(image, path string)``, the image being the transform's CHW float tensor.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None, transform: Callable):
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int | str]:
        path = self.paths[index]
        image = self.transform(image=read_rgb(path))["image"]
        return image, (str(path) if self.labels is None else self.labels[index])


class ImageNetDataModule(SwinDataModule):
    """ImageNet in the ImageFolder layout: ``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``.

    Classes are the sorted folder names of the train split; the val split must hold the same folders. Files
    are found recursively inside each class folder; only .JPEG/.jpg/.jpeg/.png files (any case) count, other
    files and hidden class folders are ignored, and a class folder without images is an error. A missing root or split
    is an error that shows the expected layout. A corrupt or unreadable image stops the run with an error
    naming the file (raised where the image is decoded, so it also surfaces from DataLoader workers); it is
    never skipped. The test split is the val split; ``predict_root`` is any folder of images, searched
    recursively, and predict batches are ``(images, paths)``.

    With ``synthetic=True`` a missing ``root`` is first filled with the deterministic "shapes" demo data
    (:func:`swin.data.shapes.write_imagefolder`, written atomically), on the first access of
    ``num_classes``/``class_names`` or in ``prepare_data``; an existing root is used as it is.

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
        train_split: folder of the training split under ``root``.
        val_split: folder of the validation (and test) split under ``root``.
        synthetic: write the shapes demo data into ``root`` if it is missing.
        synthetic_train_per_class: demo training images per class.
        synthetic_val_per_class: demo validation images per class.
        synthetic_image_size: side of the demo images.
    """

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
        train_split: str = "train",
        val_split: str = "val",
        synthetic: bool = False,
        synthetic_train_per_class: int = 300,
        synthetic_val_per_class: int = 40,
        synthetic_image_size: int = 64,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size = image_size
        self.predict_root = predict_root
        self.train_split = train_split
        self.val_split = val_split
        self._classes: list[str] | None = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            shapes.ensure(
                self.root,
                shapes.write_imagefolder,
                num_train_per_class=self.hparams.synthetic_train_per_class,
                num_val_per_class=self.hparams.synthetic_val_per_class,
                image_size=self.hparams.synthetic_image_size,
            )

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
                raise FileNotFoundError(
                    f"no class folders in {self.root / self.train_split}; "
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
                raise FileNotFoundError(f"no images (.JPEG .jpg .jpeg .png) in class folder {self.root / split / name}")
            paths += images
            labels += [label] * len(images)
        return ImageFolderDataset(paths, labels, self._transform(train))

    def _transform(self, train: bool) -> Callable:
        return classification_transforms(
            self.image_size,
            train=train,
            randaugment=self.hparams.randaugment,
            color_jitter=self.hparams.color_jitter,
            random_erasing=self.hparams.random_erasing,
            crop_scale=tuple(self.hparams.crop_scale),
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._split_dataset(self.train_split, train=True)
        if stage in ("fit", "validate", "test"):
            self.datasets["val"] = self._split_dataset(self.val_split, train=False)
        if stage == "predict":
            if self.predict_root is None:
                raise ValueError("predict needs a folder of images: set data.predict_root")
            if not Path(self.predict_root).is_dir():
                raise FileNotFoundError(f"predict_root {self.predict_root} is not a folder")
            images = list_images(Path(self.predict_root))
            if not images:
                raise FileNotFoundError(f"no images (.JPEG .jpg .jpeg .png) under predict_root {self.predict_root}")
            self.datasets["predict"] = ImageFolderDataset(images, None, self._transform(train=False))
