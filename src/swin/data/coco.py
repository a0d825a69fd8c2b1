"""COCO 2017 instances (boxes and masks) for torchvision's detectors, with the official multi-scale training resize.

Annotation files are read with pycocotools and checked up front: a missing or malformed file, an annotation whose
image, category, box or segmentation is not right, or an image missing on disk raises an error naming the file and
the annotation or image. Polygons, uncompressed and compressed RLE are decoded by pycocotools. Category ids (with
gaps in COCO) map to contiguous labels ``1..K`` in sorted id order; 0 is torchvision's background.

Training targets leave out crowd annotations, boxes without area inside the image and objects without a valid
polygon (one counted warning per file), and training skips images left without objects. Evaluation keeps every
annotation with its ``iscrowd`` flag and ``area``, so that the metric follows pycocotools' rules.

Sizes: training images are resized here (albumentations, boxes and masks in lockstep: shorter side drawn from
``train_sizes``, longer side at most ``max_size``, horizontal flip). Evaluation and prediction images stay at their
original size: the detector's own transform resizes them (800 / 1333 in the recipe) and maps its predictions back
to original coordinates, which COCO evaluation needs. Images leave as float tensors in [0, 1], not normalised:
the detector's transform normalises with the ImageNet mean and std.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops import functional as fcrops
from albumentations.pytorch import ToTensorV2
from lightning.pytorch.utilities import rank_zero_warn
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from swin.data import shapes
from swin.data.base import SwinDataModule
from swin.data.io import collate_lists, read_image
from swin.data.transforms import Pipeline, random_flips

ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking annotation files
# ---------------------------------------------------------------------------------------------------------------


def _check_segmentation(seg: Any, image: dict, where: str) -> None:
    """Raise ValueError unless ``seg`` is a list of polygons or an RLE dict matching the image size."""
    if isinstance(seg, list):
        if not all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in seg):
            raise ValueError(f"{where}: polygon segmentation must be a list of lists of numbers")
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and 'counts'")
    size = list(seg["size"])
    if size != [image["height"], image["width"]]:
        raise ValueError(
            f"{where}: RLE size {size} differs from its image's {[image['height'], image['width']]} "
            f"(image id {image['id']})"
        )
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != size[0] * size[1]:
            raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers summing to H*W")
    elif not isinstance(counts, (str, bytes)):
        raise ValueError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")


def check_coco(data: Any, path: str | os.PathLike) -> None:
    """Check the structure of a parsed COCO instances file; errors name ``path`` and the annotation id."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or malformed {key!r} list")
    if not data["categories"]:
        raise ValueError(f"{path}: no categories")
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(f"{path}: category {cat!r} needs an integer 'id' and a 'name'")
    images = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "height", "width")):
            raise ValueError(f"{path}: image entry {img!r} needs id, file_name, height and width")
        images[img["id"]] = img
    category_ids = {cat["id"] for cat in data["categories"]}
    for n, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation id {ann.get('id', f'#{n}') if isinstance(ann, dict) else f'#{n}'}"
        if not isinstance(ann, dict) or not all(k in ann for k in ANNOTATION_KEYS):
            raise ValueError(f"{where} needs {', '.join(ANNOTATION_KEYS)}")
        if ann["image_id"] not in images:
            raise ValueError(f"{where} points at image id {ann['image_id']}, which is not in the file's images")
        if ann["category_id"] not in category_ids:
            raise ValueError(f"{where} has category id {ann['category_id']}, which is not in the file's categories")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        _check_segmentation(ann["segmentation"], images[ann["image_id"]], where)


def read_coco(path: str | os.PathLike) -> COCO:
    """A checked pycocotools ``COCO`` index of an instances file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    check_coco(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def check_images(coco: COCO, image_dir: str | os.PathLike, ann_file: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the first image of ``coco`` missing from ``image_dir``."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} (for {ann_file}) does not exist")
    present = set(os.listdir(image_dir))
    missing = [img for img in coco.imgs.values() if img["file_name"] not in present]
    missing = [img for img in missing if not (image_dir / img["file_name"]).is_file()]  # names with subfolders
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{ann_file}: image {image_dir / first['file_name']} (image id {first['id']}) does not exist"
            + (f", nor do {len(missing) - 1} more images" if len(missing) > 1 else "")
        )


def valid_polygons(seg: Any) -> Any:
    """Polygon parts with at least 3 points (an even number of at least 6 coordinates); RLE unchanged."""
    if isinstance(seg, list):
        return [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    return seg


def trainable(ann: dict, image: dict) -> bool:
    """Whether a non-crowd annotation makes a training target: positive box area inside the image, a usable mask."""
    x, y, w, h = ann["bbox"]
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, image["width"]), min(y + h, image["height"])
    return x2 > x1 and y2 > y1 and valid_polygons(ann["segmentation"]) != []


def category_table(coco: COCO) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names: label ``k`` (1-based) is ``ids[k - 1]``."""
    ids = sorted(coco.cats)
    return ids, [coco.cats[i]["name"] for i in ids]


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


class ShorterSideResize(A.SmallestMaxSize):
    """Resize the shorter side to a size drawn from ``sizes``, unless that makes the longer side exceed ``max_size``;
    then the longer side becomes ``max_size`` (mmdet's ``Resize(keep_ratio=True, multiscale_mode='value')``)."""

    def __init__(self, sizes: Sequence[int], max_size: int, p: float = 1.0):
        super().__init__(max_size=list(sizes), p=p)
        self.longer_max = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        scale = super().get_params_dependent_on_data(params, data)["scale"]
        height, width = params["shape"][:2]
        return {"scale": min(scale, self.longer_max / max(height, width))}

    def apply_to_masks(self, masks: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        """The masks resized as :meth:`apply_to_mask` does, each straight into one N×H×W array (albumentations
        stacks a resized copy of each)."""
        height, width = masks.shape[1:3]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = np.empty((len(masks), size[1], size[0]), masks.dtype)
        for mask, resized in zip(masks, out):
            cv2.resize(mask, size, dst=resized, interpolation=self.mask_interpolation)
        return out


class RandomSizeCrop(A.RandomCrop):
    """Crop of random height and width, each drawn from [``min_size``, ``max_size``] and at most the image's, at a
    random place (mmdet's ``RandomCrop(crop_type='absolute_range')``)."""

    def __init__(self, min_size: int, max_size: int, p: float = 1.0):
        super().__init__(height=min_size, width=min_size, p=p)
        self.size_range = (min_size, max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        low, high = self.size_range
        size = (
            self.py_random.randint(min(height, low), min(height, high)),
            self.py_random.randint(min(width, low), min(width, high)),
        )
        start = (self.py_random.random(), self.py_random.random())
        return {"crop_coords": fcrops.get_crop_coords((height, width), size, *start), "pad_params": None}


def train_transform(
    sizes: Sequence[int],
    max_size: int,
    hflip: float = 0.5,
    crop_prob: float = 0.0,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    vflip: float = 0.0,
) -> A.Compose:
    """Multi-scale resize and flip of the image, its COCO boxes and its masks; labels travel as ``labels``/``index``.

    With ``crop_prob``, that share of the images takes the official Swin configs' second policy (from DETR): shorter
    side to one of ``crop_resize``, a random crop of ``crop_size`` (range of height and width), then the multi-scale
    resize. Objects cropped away leave with their masks; an image may end up without objects. The pipeline's random
    generators start from torch's initial seed; DataLoader workers reseed their copies (:func:`seed_worker_transforms`).
    """
    resize: A.BasicTransform = ShorterSideResize(sizes, max_size)
    if crop_prob > 0:
        crop = A.Sequential(
            [ShorterSideResize(crop_resize, max_size), RandomSizeCrop(*crop_size), ShorterSideResize(sizes, max_size)],
            p=crop_prob,
        )
        resize = A.OneOf([ShorterSideResize(sizes, max_size, p=1 - crop_prob), crop], p=1.0)
    return Pipeline(
        [resize, *random_flips(hflip, vflip), A.ToFloat(max_value=255.0), ToTensorV2()],
        bbox_params=A.BboxParams(format="coco", label_fields=["labels", "index"], clip=True),
        seed=torch.initial_seed() % 2**32,
    )


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class CocoInstances(Dataset):
    """Images of a COCO instances file with torchvision detection targets.

    Samples are ``{"image": 3×H×W float in [0, 1], "target": {...}, "image_id": int, "path": str}``.
    ``train=True``: only images with at least one usable object; targets ``boxes`` (xyxy), ``labels`` (1..K),
    ``masks`` (N×H×W uint8) after ``transform`` (default: :func:`eval_transform`, the original size).
    ``train=False``: every image through :func:`eval_transform`, every annotation, plus ``iscrowd`` and ``area``
    for COCO evaluation.
    """

    def __init__(self, coco: COCO, image_dir: str | os.PathLike, train: bool, transform: A.Compose | None = None):
        self.coco = coco
        self.image_dir = Path(image_dir)
        self.train = train
        self.transform = transform if transform is not None else eval_transform()
        self.label_of = {cid: k + 1 for k, cid in enumerate(category_table(coco)[0])}
        ids = sorted(coco.imgs)
        if train:
            ids = [i for i in ids if self.annotations(i)]
        self.ids = ids

    def annotations(self, image_id: int) -> list[dict]:
        """The image's annotations as this split uses them (training: non-crowd and trainable only)."""
        anns = self.coco.imgToAnns.get(image_id, [])
        if not self.train:
            return anns
        image = self.coco.imgs[image_id]
        return [a for a in anns if not a.get("iscrowd", 0) and trainable(a, image)]

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, ann: dict) -> np.ndarray:
        """H×W uint8 mask (empty when no polygon is valid; such objects only reach evaluation)."""
        seg = valid_polygons(ann["segmentation"])
        if seg == []:
            info = self.coco.imgs[ann["image_id"]]
            return np.zeros((info["height"], info["width"]), np.uint8)
        return self.coco.annToMask({**ann, "segmentation": seg})

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = read_image(path, (info["height"], info["width"]))
        anns = self.annotations(image_id)
        image, target = self._train_sample(image, anns) if self.train else self._eval_sample(image, anns)
        return {"image": image, "target": target, "image_id": image_id, "path": str(path)}

    def _eval_sample(self, image: np.ndarray, anns: list[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        height, width = image.shape[:2]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([self.mask(a) for a in anns]) if anns else np.zeros((0, height, width), np.uint8)
        target = {
            "boxes": box_convert(boxes, "xywh", "xyxy"),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns]),
        }
        return self.transform(image=image)["image"], target

    def _train_sample(self, image: np.ndarray, anns: list[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.transform(
            image=image, masks=np.stack([self.mask(a) for a in anns]),
            bboxes=np.array([a["bbox"] for a in anns], np.float32),
            labels=[self.label_of[a["category_id"]] for a in anns], index=list(range(len(anns))),
        )  # fmt: skip
        boxes = torch.from_numpy(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
        masks = torch.as_tensor(out["masks"])
        if len(out["index"]) < len(masks):  # boxes albumentations dropped take their masks along
            masks = masks[torch.as_tensor(np.asarray(out["index"], np.int64))]
        target = {
            "boxes": box_convert(boxes, "xywh", "xyxy"),
            "labels": torch.as_tensor(np.asarray(out["labels"], np.int64)),
            "masks": masks,
        }
        return out["image"], target


def eval_transform() -> A.Compose:
    """Evaluation and prediction images: the original size, as float in [0, 1] (the detector resizes and
    normalises them itself)."""
    return A.Compose([A.ToFloat(max_value=255.0), ToTensorV2()])


# ---------------------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------------------


class COCODataModule(SwinDataModule):
    """COCO 2017 layout: ``root/annotations/instances_{train,val}2017.json``, images in ``root/{train,val}2017/``.

    Args:
        root: dataset folder.
        train_ann: training annotation file, relative to ``root``.
        val_ann: validation annotation file, relative to ``root``.
        test_ann: test annotation file (default: ``val_ann``).
        train_images: training image folder, relative to ``root``.
        val_images: validation image folder.
        test_images: test image folder (default: ``val_images``).
        predict_root: folder of images to predict on (default: the validation images).
        batch_size: images per device and step.
        num_workers: data loading processes.
        train_sizes: shorter sides the training resize draws from (480-800, step 32 in the recipe).
        max_size: longest side of a training image (1333 in the recipe).
        hflip: probability of a horizontal flip in training.
        vflip: probability of a vertical flip in training (aerial, microscope, document scans).
        crop_prob: share of training images that take the crop policy of the official configs (0.5 there).
        crop_resize: shorter sides before that crop.
        crop_size: range of the crop's height and width.
        synthetic: write the synthetic shapes dataset (``shapes.write_coco``) to ``root`` when it is missing.
        synthetic_kwargs: arguments of ``shapes.write_coco`` (``num_train``, ``num_val``, ``image_size``, ``seed``).
        persistent_workers: keep the loader workers alive between epochs (with ``num_workers`` > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies; None: on when CUDA is there.
        prefetch_factor: batches each loader worker loads ahead (with ``num_workers`` > 0).

    Batches are dicts of lists (images differ in size): ``image``, ``target``, ``image_id``, ``path``; predict
    batches ``image``, ``path``, ``size`` for a ``predict_root`` folder, else the validation split's samples.
    """

    drop_last = False  # detection batches are small; the last one still teaches
    write_synthetic = staticmethod(shapes.write_coco)

    def __init__(
        self,
        root: str = "data/coco",
        train_ann: str = "annotations/instances_train2017.json",
        val_ann: str = "annotations/instances_val2017.json",
        test_ann: str | None = None,
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_images: str | None = None,
        predict_root: str | None = None,
        batch_size: int = 2,
        num_workers: int = 4,
        train_sizes: Sequence[int] = tuple(range(480, 801, 32)),
        max_size: int = 1333,
        hflip: float = 0.5,
        vflip: float = 0.0,
        crop_prob: float = 0.0,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        synthetic: bool = False,
        synthetic_kwargs: dict[str, Any] | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(root, batch_size, num_workers, None, predict_root, synthetic, synthetic_kwargs,
                         persistent_workers=persistent_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
        self.splits = {
            "train": (train_ann, train_images),
            "val": (val_ann, val_images),
            "test": (test_ann or val_ann, test_images or val_images),
        }
        self.train_sizes = tuple(train_sizes)
        self.max_size = max_size
        self.transform_kwargs = dict(
            hflip=hflip, vflip=vflip, crop_prob=crop_prob, crop_resize=crop_resize, crop_size=crop_size
        )
        self._cocos: dict[Path, COCO] = {}

    # -- data on disk ---------------------------------------------------------------------------------------------
    def coco(self, split: str) -> COCO:
        """The checked annotation index of ``split`` (read once)."""
        self.prepare_data()
        path = self.root / self.splits[split][0]
        if path not in self._cocos:
            self._cocos[path] = read_coco(path)
        return self._cocos[path]

    def _category_source(self) -> str:
        """The split the class list comes from: validation (the small file) when present, else training."""
        self.prepare_data()
        for split in ("val", "train"):
            if (self.root / self.splits[split][0]).is_file():
                return split
        files = " nor ".join(str(self.root / self.splits[s][0]) for s in ("val", "train"))
        raise FileNotFoundError(f"neither COCO annotation file {files} exists")

    # -- the class list the CLI links into the task ---------------------------------------------------------------
    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each contiguous label: label ``k`` (1..K) is ``category_ids[k - 1]``."""
        return category_table(self.coco(self._category_source()))[0]

    @property
    def class_names(self) -> list[str]:
        return category_table(self.coco(self._category_source()))[1]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    # -- datasets -------------------------------------------------------------------------------------------------
    def _dataset(self, split: str, train: bool) -> CocoInstances:
        ann_file, image_folder = self.splits[split]
        coco, source = self.coco(split), self._category_source()
        if category_table(coco) != category_table(self.coco(source)):
            raise ValueError(f"{self.root / ann_file} has other categories than {self.root / self.splits[source][0]}")
        check_images(coco, self.root / image_folder, self.root / ann_file)
        transform = train_transform(self.train_sizes, self.max_size, **self.transform_kwargs) if train else None
        dataset = CocoInstances(coco, self.root / image_folder, train, transform)
        if train:
            self._warn_left_out(coco, self.root / ann_file)
        return dataset

    @staticmethod
    def _warn_left_out(coco: COCO, path: Path) -> None:
        objects = [a for a in coco.anns.values() if not a.get("iscrowd", 0)]
        bad = [a["id"] for a in objects if not trainable(a, coco.imgs[a["image_id"]])]
        if bad:
            rank_zero_warn(
                f"{path}: {len(bad)} annotations have a degenerate box (no area inside the image) or no valid "
                f"polygon and are left out of the training targets (ids {bad[:10]}{' ...' if len(bad) > 10 else ''})"
            )

    def _warn_untrained_categories(self) -> None:
        """One counted warning for the categories that validation annotates but training never does."""
        train, val = self.coco("train"), self.coco("val")
        trained = {a["category_id"] for a in train.anns.values() if not a.get("iscrowd", 0)}
        missing = sorted({a["category_id"] for a in val.anns.values()} - trained)
        if missing:
            names = ", ".join(f"{val.cats[c]['name']!r} (id {c}, {len(val.getAnnIds(catIds=[c]))})" for c in missing)
            rank_zero_warn(
                f"{self.root / self.splits['val'][0]}: {len(missing)} categor{'y' if len(missing) == 1 else 'ies'} "
                f"annotated in validation but never in {self.root / self.splits['train'][0]}, so the model cannot "
                f"learn them and their AP will be 0: {names}. Check the category ids, or move some of those images "
                "to training."
            )

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset("val", train=False)
        if stage == "fit":
            self._warn_untrained_categories()
        if stage == "test":
            self.datasets["test"] = self._dataset("test", train=False)
        if stage == "predict":
            self.datasets["predict"] = (
                self.predict_dataset(eval_transform()) if self.predict_root else self._dataset("val", train=False)
            )

    def collate_fn(self, train: bool) -> Callable:
        return collate_lists
