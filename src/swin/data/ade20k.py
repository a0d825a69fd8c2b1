"""ADE20K (SceneParsing, ``ADEChallengeData2016`` layout) for semantic segmentation, with the mmseg training pipeline.

Layout: ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png`` with the
same stems; annotations are single-channel PNGs. With ``reduce_zero_label`` (ADE20K's convention) label 0
("other") becomes the ignore index 255 and every other label moves down by one, so K classes are stored as 1..K.

Training (mmseg's ``Resize`` / ``RandomCrop`` / ``RandomFlip`` / ``PhotoMetricDistortion`` / ``Pad``): random
rescale by 0.5-2.0 of ``base_size`` keeping the aspect ratio, a random crop in which no class covers more than
``cat_max_ratio`` (10 tries), horizontal flip, brightness / contrast / saturation / hue distortion, ImageNet
normalisation, padding to the crop (0 for the image after normalisation, 255 for labels). Evaluation resizes the
image to fit ``base_size`` with its aspect ratio and keeps the annotation at its own size for the metrics, so eval
batches are lists (images of different sizes).

Before training, every annotation's classes are read once (PIL's colour count, in threads): a label out of range
is an error naming the file at start-up rather than hours into the run, and classes that validation holds but
training never does get one counted warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.pytorch import ToTensorV2
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from swin.data import shapes
from swin.data.base import SwinDataModule
from swin.data.io import collate_lists, is_image_file, read_image
from swin.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Pipeline, random_flips

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "ADE20KDataModule",
    "ADE20KDataset",
    "RandomRescale",
    "fit_size",
    "photometric_distortion",
    "resolve_class_names",
    "CatMaxRatioCrop",
    "class_counts",
    "label_classes",
    "paired_files",
    "read_label",
    "train_transform",
    "eval_transform",
]

IGNORE_INDEX = 255

# fmt: off
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
# fmt: on


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def paired_files(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ``split`` matched by stem; an error names any image without an annotation
    or annotation without an image."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist (ADEChallengeData2016 layout expected)")
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if is_image_file(p)}
    if not images:
        raise FileNotFoundError(f"no images in {image_dir}")
    labels = {p.stem: p for p in sorted(label_dir.iterdir()) if p.suffix.lower() == ".png"}
    if unpaired := sorted(images.keys() - labels.keys()):
        names = ", ".join(str(images[s]) for s in unpaired[:5])
        raise FileNotFoundError(f"{len(unpaired)} image(s) without an annotation in {label_dir}: {names}")
    if unpaired := sorted(labels.keys() - images.keys()):
        names = ", ".join(str(labels[s]) for s in unpaired[:5])
        raise FileNotFoundError(f"{len(unpaired)} annotation(s) without an image in {image_dir}: {names}")
    return [(images[s], labels[s]) for s in sorted(images)]


LABEL_MODES = ("L", "P", "I", "I;16")


def _open_label(path: Path) -> Image.Image:
    im = Image.open(path)
    if im.mode not in LABEL_MODES:
        im.close()
        raise ValueError(
            f"annotation {path} has mode {im.mode}; expected a single-channel label PNG of class indices "
            "(an RGB colour-palette mask must first be mapped to indices, e.g. saved as mode 'P' or 'L')"
        )
    return im


def _check_range(path: Path, values: np.ndarray, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """The class of each raw annotation value (``IGNORE_INDEX`` for ignored ones); an error names the file when a
    value lies outside 0..K (with ``reduce_zero_label``), 0..K-1 (without) and 255."""
    label = np.where(values == 0, IGNORE_INDEX, values - 1) if reduce_zero_label else values.copy()
    label[values == IGNORE_INDEX] = IGNORE_INDEX
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        top = num_classes if reduce_zero_label else num_classes - 1
        raise ValueError(
            f"annotation {path} holds labels {np.unique(values[bad]).tolist()} outside 0..{top} and {IGNORE_INDEX} "
            f"({num_classes} classes, reduce_zero_label={reduce_zero_label})"
        )
    return label


def read_label(
    path: Path, num_classes: int, reduce_zero_label: bool = True, size: tuple[int, int] | None = None
) -> np.ndarray:
    """H×W uint8 class indices (``IGNORE_INDEX`` for ignored pixels) of a single-channel annotation PNG.

    Errors name the file when it is not single-channel, when its (H, W) differs from ``size``, or when it holds
    a label outside 0..K (with ``reduce_zero_label``), 0..K-1 (without) and 255.
    """
    with _open_label(path) as im:
        raw = np.asarray(im).astype(np.int64)
    if size is not None and raw.shape != tuple(size):
        height, width = raw.shape
        raise ValueError(f"annotation {path} is {height}×{width} (H×W) but its image is {size[0]}×{size[1]}")
    return _check_range(path, raw, num_classes, reduce_zero_label).astype(np.uint8)


def label_classes(path: Path, num_classes: int, reduce_zero_label: bool = True) -> set[int]:
    """The classes an annotation PNG holds (errors as :func:`read_label`), from PIL's colour count of the file."""
    with _open_label(path) as im:
        values = np.array([value for _, value in im.getcolors(maxcolors=1 << 16)], dtype=np.int64)
    return set(_check_range(path, values, num_classes, reduce_zero_label).tolist()) - {IGNORE_INDEX}


def class_counts(
    pairs: Sequence[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool = True
) -> dict[int, list[Path]]:
    """Class -> the annotations that hold it, over every pair (read in threads: about a millisecond a file)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda pair: label_classes(pair[1], num_classes, reduce_zero_label), pairs)
        counts: dict[int, list[Path]] = {}
        for (_, label_path), classes in zip(pairs, found):
            for k in classes:
                counts.setdefault(k, []).append(label_path)
    return counts


def warn_untrained_classes(
    train: dict[int, list[Path]], val: dict[int, list[Path]], class_names: Sequence[str], val_dir: Path
) -> list[int]:
    """Warn (once, counted) about classes that validation annotations hold but no training annotation does."""
    missing = sorted(set(val) - set(train))
    if missing:
        listed = ", ".join(f"{k} {class_names[k]!r} ({len(val[k])}, e.g. {val[k][0].name})" for k in missing[:10])
        rank_zero_warn(
            f"{val_dir}: {len(missing)} class(es) appear in validation annotations but in no training annotation, "
            f"so the model cannot learn them and their IoU will be 0: {listed}"
            f"{' ...' if len(missing) > 10 else ''}. Check the label mapping, or move some of those images to training."
        )
    return missing


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def fit_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long side ≤ max(scale) and short side ≤ min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomRescale(A.DualTransform):
    """Rescale keeping the aspect ratio to fit ``base_size`` × r, r ~ U(``ratio_range``) (mmseg ``Resize`` with
    ``keep_ratio`` and ``ratio_range``); bilinear for images, nearest for masks."""

    def __init__(
        self, base_size: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0), p: float = 1.0
    ):
        super().__init__(p=p)
        self.base_size = tuple(base_size)
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        ratio = self.py_random.uniform(*self.ratio_range)
        height, width = params["shape"][:2]
        return {"size": fit_size(height, width, [int(s * ratio) for s in self.base_size])}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(img, size, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(mask, size, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("base_size", "ratio_range")


class CatMaxRatioCrop(A.DualTransform):
    """mmseg's ``RandomCrop``: a crop of at most ``size`` (H, W) in which no class covers more than
    ``cat_max_ratio`` of the labelled pixels (and more than one class is present), up to 10 tries."""

    def __init__(
        self,
        size: Sequence[int] = (512, 512),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        y, x = self.py_random.randint(0, height - crop_h), self.py_random.randint(0, width - crop_w)
        return x, y, x + crop_w, y + crop_h

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        box = self._random_box(height, width)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                x1, y1, x2, y2 = box
                counts = np.bincount(mask[y1:y2, x1:x2].ravel())  # pixels per class (a sort is 10x the time)
                counts = np.delete(counts, self.ignore_index) if len(counts) > self.ignore_index else counts
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._random_box(height, width)
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x1, y1, x2, y2 = box
        return img[y1:y2, x1:x2]

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return self.apply(mask, box)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "cat_max_ratio", "ignore_index")


def photometric_distortion() -> A.BaseCompose:
    """mmseg's ``PhotoMetricDistortion``, each step with probability 0.5: brightness ±32, contrast ×0.5-1.5 (before
    or after the colour steps, at random), saturation ×0.5-1.5, hue ±18 (OpenCV hue units, i.e. ±36°)."""

    def contrast() -> A.BasicTransform:
        return A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5)

    def colour() -> list[A.BasicTransform]:
        return [
            A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(0.5, 1.5), hue=(0.0, 0.0), p=0.5),
            A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=0, val_shift_limit=0, p=0.5),
        ]

    return A.Sequential(
        [
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, brightness_by_max=True, p=0.5),
            A.OneOf([A.Sequential([contrast(), *colour()]), A.Sequential([*colour(), contrast()])], p=1.0),
        ]
    )


def train_transform(
    crop_size: Sequence[int],
    base_size: Sequence[int] = (2048, 512),
    scale_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    vflip: float = 0.0,
    photometric: bool = True,
) -> A.Compose:
    """The mmseg ADE20K training pipeline; returns a normalised CHW float image and an H×W mask of the crop size."""
    return Pipeline(
        [
            RandomRescale(base_size, scale_range),
            CatMaxRatioCrop(crop_size, cat_max_ratio, IGNORE_INDEX),
            *random_flips(hflip, vflip),
            *([photometric_distortion()] if photometric else []),
            A.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            A.PadIfNeeded(
                *crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX
            ),
            ToTensorV2(),
        ],
        seed=torch.initial_seed() % 2**32,
    )


def eval_transform(base_size: Sequence[int] = (2048, 512)) -> A.Compose:
    """Resize to fit ``base_size`` keeping the aspect ratio, normalise; for images only."""
    return A.Compose([RandomRescale(base_size, (1.0, 1.0)), A.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensorV2()])


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class ADE20KDataset(Dataset):
    """(image, annotation) pairs read on access.

    ``train=True``: the transform gets image and mask (a cropped, padded pair). ``train=False``: the transform
    gets the image only and the mask keeps the annotation's size. Samples: ``image`` (3, H, W) float, ``mask``
    (H, W) int64, ``path``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        num_classes: int,
        transform: A.Compose,
        train: bool = True,
        reduce_zero_label: bool = True,
    ):
        self.pairs = list(pairs)
        self.num_classes = num_classes
        self.transform = transform
        self.train = train
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = read_label(label_path, self.num_classes, self.reduce_zero_label, image.shape[:2])
        if self.train:
            out = self.transform(image=image, mask=label)
            return {"image": out["image"], "mask": out["mask"].long(), "path": str(image_path)}
        return {
            "image": self.transform(image=image)["image"],
            "mask": torch.from_numpy(label.astype(np.int64)),
            "path": str(image_path),
        }


# ---------------------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------------------


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class ADE20KDataModule(SwinDataModule):
    """ADE20K or any folder in its layout.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        batch_size: training images per device (2 in the recipe: 16 on 8 GPUs).
        eval_batch_size: images per device in validation, test and predict (lists: sizes differ).
        num_workers: loader processes.
        num_classes: classes after ``reduce_zero_label``; None: 150 (ADE20K), or the shapes' classes with
            ``synthetic``.
        class_names: names of the classes; None: ADE20K's (or the shapes') when the count matches, else
            ``class_{i}``.
        reduce_zero_label: label 0 is ignored, the others shift down by one.
        crop_size: training crop (H, W) or one side.
        base_size: (long, short) bound of the keep-ratio resize, 2048×512 for ADE20K.
        scale_range: training rescale ratios of ``base_size``.
        cat_max_ratio: the most one class may cover in a training crop (1.0: any crop).
        hflip: horizontal-flip probability in training (0.5 in the recipe).
        vflip: vertical-flip probability in training (0 in the recipe; e.g. 0.5 for aerial or microscope images).
        photometric: photometric distortion in training.
        predict_root: folder of images for ``predict`` (default: ``root/images/validation``).
        synthetic: write synthetic shapes in this layout to ``root`` when it is missing (the demo).
        synthetic_kwargs: arguments of ``shapes.write_ade20k`` (``num_train``, ``num_val``, ``image_size``, ``seed``).
        persistent_workers: keep the loader workers alive between epochs (with ``num_workers`` > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies; None: on when CUDA is there.
        prefetch_factor: batches each loader worker loads ahead (with ``num_workers`` > 0).

    Samples are dicts: ``image``, ``mask``, ``path`` (predict: ``image``, ``path``, ``size``); evaluation and
    predict batches are dicts of lists (sizes differ).

    ``validate`` and ``test`` both use the validation split (ADE20K's test annotations are not public). Training
    drops the last incomplete batch: BatchNorm on the 1×1 pyramid level needs two or more images.
    """

    write_synthetic = staticmethod(shapes.write_ade20k)

    def __init__(
        self,
        root: str = "data/ADEChallengeData2016",
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        reduce_zero_label: bool = True,
        crop_size: int | tuple[int, int] = 512,
        base_size: tuple[int, int] = (2048, 512),
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        vflip: float = 0.0,
        photometric: bool = True,
        predict_root: str | None = None,
        synthetic: bool = False,
        synthetic_kwargs: dict[str, Any] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(root, batch_size, num_workers, eval_batch_size, predict_root, synthetic, synthetic_kwargs,
                         persistent_workers=persistent_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
        self.reduce_zero_label = reduce_zero_label
        self.crop_size = _pair(crop_size)
        self.base_size = tuple(base_size)
        self.scale_range = tuple(scale_range)
        self.cat_max_ratio = cat_max_ratio
        self.flips = dict(hflip=hflip, vflip=vflip)
        self.photometric = photometric
        self._class_names = resolve_class_names(num_classes, class_names, synthetic)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def setup(self, stage: str) -> None:
        self.prepare_data()  # every rank: a no-op once the data exists (the writer is atomic)
        labelled = dict(num_classes=self.num_classes, reduce_zero_label=self.reduce_zero_label)
        if stage == "fit":
            transform = train_transform(
                self.crop_size, self.base_size, self.scale_range, self.cat_max_ratio, **self.flips,
                photometric=self.photometric,
            )  # fmt: skip
            pairs = paired_files(self.root, "training")
            self.datasets["train"] = ADE20KDataset(pairs, transform=transform, **labelled)
        if stage in ("fit", "validate", "test"):
            val_pairs = paired_files(self.root, "validation")
            transform = eval_transform(self.base_size)
            self.datasets["val"] = ADE20KDataset(val_pairs, transform=transform, train=False, **labelled)
        if stage == "fit":  # every label checked before the first step, not hours into the run
            train, val = class_counts(pairs, **labelled), class_counts(val_pairs, **labelled)
            warn_untrained_classes(train, val, self._class_names, self.root / "annotations" / "validation")
        if stage == "predict":
            default = self.root / "images" / "validation"
            self.datasets["predict"] = self.predict_dataset(eval_transform(self.base_size), default)

    def collate_fn(self, train: bool) -> Callable | None:
        return None if train else collate_lists


def resolve_class_names(num_classes: int | None, class_names: Sequence[str] | None, synthetic: bool) -> list[str]:
    """The class names for a count: given ones (checked against the count), the defaults (ADE20K's 150, or the
    shapes' with ``synthetic``) when the count matches them or is None, else ``class_{i}``."""
    if class_names is not None:
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        return list(class_names)
    defaults = list(shapes.SHAPE_CLASSES) if synthetic else ADE20K_CLASSES
    if num_classes is None or num_classes == len(defaults):
        return list(defaults)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return [f"class_{i}" for i in range(num_classes)]
