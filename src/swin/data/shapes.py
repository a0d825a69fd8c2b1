"""Synthetic "shapes" demo data, written in the real ImageFolder, COCO 2017 and ADE20K layouts.

Every image is rendered from its own random generator, seeded by ``(seed, layout, split, index)``, so a writer's
output depends only on its arguments: the same seed gives the same bytes and annotations.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross"]
COCO_CATEGORY_IDS = [1, 3, 7, 10, 15]  # with gaps, like COCO's 1..90
ADE20K_CLASSES = ["other", *SHAPE_CLASSES]  # label 0 is the background "other"

Instance = tuple[int, np.ndarray]  # (class index, H×W bool mask)

# Bright shapes on darker backgrounds, turned by at most ±0.25 rad (14°). Measured with a 3-stage Swin (C=32,
# window 4) from scratch, 5 classes at 64 px, batch 32, lr 1e-3, crop scale 0.35-1, 400 steps: objects of random
# brightness stayed at chance (0.19 val top-1 after 150 steps, freely rotated or not); bright objects reached 0.58
# when freely rotated and 0.89 when turned by at most 14°.
_BACKGROUND_GAIN = 0.45
_MIN_OBJECT_LUMINANCE = 150
_MAX_ROTATION = 0.25
_SPLITS = ("train", "val")
_LAYOUTS = ("imagefolder", "coco", "ade20k")


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dark solid, linear-gradient or noisy background as an H×W×3 float array in [0, 115]."""
    kind = rng.integers(3)
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx * np.cos(angle) / width + yy * np.sin(angle) / height
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        image = (1 - t)[..., None] * _random_color(rng) + t[..., None] * _random_color(rng)
    else:
        image = np.broadcast_to(_random_color(rng), (height, width, 3)).copy()
    noise = rng.uniform(15, 35) if kind == 2 else rng.uniform(0, 6)
    return np.clip(image + rng.normal(0, noise, size=image.shape), 0, 255) * _BACKGROUND_GAIN


def _luminance(color: np.ndarray) -> float:
    return float(color @ np.array([0.299, 0.587, 0.114], np.float32))


def _bright_color(rng: np.random.Generator) -> np.ndarray:
    """A random colour of luminance above :data:`_MIN_OBJECT_LUMINANCE`, so objects stand out of the background."""
    color = _random_color(rng)
    while _luminance(color) < _MIN_OBJECT_LUMINANCE:
        color = _random_color(rng)
    return color


def shape_polygon(
    cls: int, cx: float, cy: float, radius: float, angle: float, stretch: float = 1.0
) -> list[tuple[float, float]]:
    """Vertices of shape ``SHAPE_CLASSES[cls]`` centred at (cx, cy), rotated by ``angle`` (radians).

    ``radius`` is the circumradius; ``stretch`` scales the x axis before rotation (ellipses, rectangles).
    """
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / np.sqrt(2)
    elif name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(t), -np.sin(t)], 1)
    elif name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(t), -r * np.sin(t)], 1)
    else:  # cross
        a, b = 0.3, 0.95  # half arm width, arm length (circumradius 1)
        pts = np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
    pts = pts * [radius * stretch, radius]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T + [cx, cy]
    return [(float(x), float(y)) for x, y in pts]


def _polygon_mask(outline: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """Rasterise with pycocotools, so that a polygon annotation decodes to exactly the pixels drawn."""
    rle = mask_utils.frPyObjects([[v for point in outline for v in point]], height, width)
    return mask_utils.decode(rle)[..., 0].astype(bool)


def _draw_scene(
    rng: np.random.Generator, image_size: int | Sequence[int], objects: Sequence[tuple[int, float]]
) -> tuple[np.ndarray, list[Instance], list[list[tuple[float, float]]]]:
    """:func:`render_scene` that also returns each object's drawn outline (before occlusion)."""
    height, width = _size_hw(image_size)
    image = random_background(rng, height, width)
    instances: list[Instance] = []
    outlines = []
    for cls, rel_radius in objects:
        radius = rel_radius * min(height, width)
        stretch = rng.uniform(0.8, 1.2)
        reach = radius * max(stretch, 1.0)
        cx = rng.uniform(min(reach, width / 2), max(width - reach, width / 2))
        cy = rng.uniform(min(reach, height / 2), max(height - reach, height / 2))
        angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        outline = shape_polygon(cls, cx, cy, radius, angle, stretch)
        mask = _polygon_mask(outline, height, width)
        color = _bright_color(rng)
        shade = rng.normal(0, 6, size=(int(mask.sum()), 1))
        image[mask] = np.clip(color + shade, 0, 255)
        for _, earlier in instances:
            earlier &= ~mask
        instances.append((int(cls), mask))
        outlines.append(outline)
    return image.round().astype(np.uint8), instances, outlines


def render_scene(
    rng: np.random.Generator, image_size: int | Sequence[int], objects: Sequence[tuple[int, float]]
) -> tuple[np.ndarray, list[Instance]]:
    """Render one scene: a random background, then ``objects`` drawn in order.

    ``objects`` holds (class index, circumradius as a fraction of the shorter side); position, rotation (±14°),
    aspect and a bright colour are drawn from ``rng``. Each object lies inside the image; later objects occlude
    earlier ones and the earlier masks are cut accordingly (a mask may become empty). Returns the H×W×3 uint8 image and one
    (class index, H×W bool mask) per object, in drawing order.
    """
    image, instances, _ = _draw_scene(rng, image_size, objects)
    return image, instances


def _rng(seed: int, layout: str, split: str, *index: int) -> np.random.Generator:
    """The generator of one image, independent of how many images the writer renders."""
    return np.random.default_rng([seed, _LAYOUTS.index(layout), _SPLITS.index(split), *index])


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, quality=92)


def _scene_objects(rng: np.random.Generator, max_objects: int) -> list[tuple[int, float]]:
    num = int(rng.integers(1, max_objects + 1))
    return [(int(rng.integers(len(SHAPE_CLASSES))), float(rng.uniform(0.08, 0.3))) for _ in range(num)]


def write_imagefolder(
    root: str | Path, num_train: int = 100, num_val: int = 20, image_size: int | Sequence[int] = 64, seed: int = 0
) -> None:
    """Write ``root/{train,val}/<class>/<class>_<i>.JPEG``: one large shape per image, ImageNet style; ``num_train``
    and ``num_val`` images per class."""
    root = Path(root)
    for split, count in (("train", num_train), ("val", num_val)):
        for cls, name in enumerate(SHAPE_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = _rng(seed, "imagefolder", split, cls, i)
                image, _ = render_scene(rng, image_size, [(cls, rng.uniform(0.2, 0.45))])
                _save_jpeg(image, folder / f"{name}_{i:05d}.JPEG")


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _coco_annotation(mask: np.ndarray, cls: int, segmentation: list | dict, iscrowd: int) -> dict:
    height, width = mask.shape
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {**segmentation, "counts": segmentation["counts"].encode("ascii")}
    return {
        "category_id": COCO_CATEGORY_IDS[cls],
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd,
    }


def _segmentation(mask: np.ndarray, outline: list[tuple[float, float]], style: str) -> list | dict:
    if style == "polygon":
        return [[v for point in outline for v in point]]
    if style == "rle_list":
        return _uncompressed_rle(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _coco_split(root: Path, split: str, count: int, first_id: int, image_size, seed: int) -> dict:
    """Render one split's images into ``root/<split>2017`` and return its COCO json.

    Unoccluded objects are stored as polygons (their drawn outline) every other time, the rest as compressed
    RLE or, every third one, uncompressed RLE; images with ``i % 4 == 1`` get a crowd (``iscrowd=1``, uncompressed
    RLE, as in COCO) of small shapes beneath the objects; images with ``i % 7 == 3`` hold no object at all.
    """
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    height, width = _size_hw(image_size)
    images, annotations = [], []
    for i in range(count):
        rng = _rng(seed, "coco", split, i)
        image_id = first_id + i
        objects = [] if i % 7 == 3 else _scene_objects(rng, 5)
        crowd = []
        if objects and i % 4 == 1:
            crowd_cls = int(rng.integers(len(SHAPE_CLASSES)))
            crowd = [(crowd_cls, float(rng.uniform(0.04, 0.07))) for _ in range(int(rng.integers(4, 8)))]
        image, instances, outlines = _draw_scene(rng, (height, width), crowd + objects)
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(image, folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})

        anns = []
        if crowd:
            union = np.logical_or.reduce([mask for _, mask in instances[: len(crowd)]])
            if union.any():
                anns.append(_coco_annotation(union, crowd[0][0], _uncompressed_rle(union), iscrowd=1))
        for k in range(len(crowd), len(instances)):
            cls, mask = instances[k]
            if mask.sum() < 4:  # (almost) hidden under later objects
                continue
            occluded = mask.sum() < _polygon_mask(outlines[k], height, width).sum()
            style = "polygon" if not occluded and k % 2 == 0 else ("rle_list" if k % 3 == 2 else "rle")
            anns.append(_coco_annotation(mask, cls, _segmentation(mask, outlines[k], style), iscrowd=0))
        for n, ann in enumerate(anns):
            ann.update(id=image_id * 100 + n + 1, image_id=image_id)
        annotations += anns
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(COCO_CATEGORY_IDS, SHAPE_CLASSES)
    ]
    return {
        "info": {"description": "synthetic shapes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(
    root: str | Path, num_train: int = 64, num_val: int = 16, image_size: int | Sequence[int] = 128, seed: int = 0
) -> None:
    """Write ``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/*.jpg``.

    Several shapes per image, category ids with gaps (:data:`COCO_CATEGORY_IDS`), polygon, compressed-RLE and
    uncompressed-RLE masks, crowd regions and a few images without objects; image ids are unique across splits.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, first_id in (("train", num_train, 1), ("val", num_val, num_train + 1)):
        dataset = _coco_split(root, split, count, first_id, image_size, seed)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))


def write_ade20k(
    root: str | Path, num_train: int = 64, num_val: int = 16, image_size: int | Sequence[int] = 128, seed: int = 0
) -> None:
    """Write ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``.

    Label maps are 8-bit 'L' PNGs with the image's file stem: 0 is the background "other", ``k + 1`` is
    ``SHAPE_CLASSES[k]`` (see :data:`ADE20K_CLASSES`).
    """
    root = Path(root)
    for split, folder, prefix, count in (
        ("train", "training", "ADE_train", num_train),
        ("val", "validation", "ADE_val", num_val),
    ):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = _rng(seed, "ade20k", split, i)
            image, instances = render_scene(rng, image_size, _scene_objects(rng, 6))
            label = np.zeros(image.shape[:2], np.uint8)
            for cls, mask in instances:
                label[mask] = cls + 1
            stem = f"{prefix}_{i + 1:08d}"
            _save_jpeg(image, root / "images" / folder / f"{stem}.jpg")
            Image.fromarray(label).save(root / "annotations" / folder / f"{stem}.png")


def ensure(root: str | Path, writer: Callable[..., None], **kwargs) -> Path:
    """Run ``writer(tmp, **kwargs)`` and rename ``tmp`` to ``root`` if ``root`` does not exist yet.

    ``tmp`` is a fresh sibling of ``root``, so the rename is atomic: other processes (e.g. DDP ranks racing for
    the same data) see either no ``root`` or a complete one; a loser of the race discards its own copy.
    """
    root = Path(root)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        writer(tmp, **kwargs)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
