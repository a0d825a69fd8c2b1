"""Input pipelines (``python -m swin.bench --data``): this project's training and evaluation datasets against timm's
and torchvision's transforms on the same files, per loader worker (one process, one thread).

The benchmark writes its own data into ``--data-dir``: ImageNet-like JPEGs (about 500×375, quality 90, crops of the
photographs bundled with scikit-image with a colour cast and sensor noise), COCO-layout images with an instances file
(polygons, compressed RLE and crowd regions) and ADE20K-layout images with label PNGs. What is timed is one
sample's ``__getitem__``, file to tensor, on each side:

- **classification**: ours, :class:`swin.data.imagenet.ImageNetDataModule`'s training set read as the training
  loader reads it (:class:`swin.data.samplers.SeededSamples`): decode, RandomResizedCrop 224 bicubic, flip,
  RandAugment m9-mstd0.5-inc1, random erasing 0.25, normalise; timm: ``create_transform(224, is_training=True,
  auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="bicubic")`` on ``Image.open(f).convert("RGB")``
  (timm's ``ImageDataset``);
- **evaluation**: ours, the datamodule's val set (resize to 256, centre crop 224, normalise); timm's eval transform;
- **detection**: ours, :class:`swin.data.coco.COCODataModule`'s training set (shorter side 480-800, longer ≤ 1333,
  flip, boxes and masks in lockstep); torchvision ``transforms.v2`` on ``decode_image`` with ``BoundingBoxes`` and a
  ``Mask`` of the annotations' ``annToMask`` (pycocotools): ``RandomShortestSize``, ``RandomHorizontalFlip``,
  ``ToDtype``, xyxy boxes clamped and sanitised;
- **segmentation**: ours, :class:`swin.data.ade20k.ADE20KDataModule`'s training set (rescale 0.5-2.0 of 2048×512,
  crop 512 with ``cat_max_ratio`` 0.75, flip, photometric distortion, normalise, pad); torchvision ``ScaleJitter``,
  ``RandomCrop`` (padded, no ``cat_max_ratio``: torchvision has none), ``RandomHorizontalFlip``, ``ColorJitter``,
  ``ToDtype``, ``Normalize``.

Steps alternate between the two sides (:func:`swin.bench.common.time_alternating`) on the process's CPU clock, each
step ``--chunk`` consecutive images (both sides see the same images in the same order); images/s is the median
over ``--repeats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from swin.bench.coco_eval import SIZES as COCO_SIZES
from swin.bench.coco_eval import ellipse_mask, random_boxes
from swin.bench.common import machine, machine_line, name_list, section, time_alternating

PIPELINES = ("classification", "evaluation", "detection", "segmentation")
PEERS = {"classification": "timm", "evaluation": "timm", "detection": "torchvision", "segmentation": "torchvision"}
GOAL = 1.2  # ours ÷ the peer, images/s per worker, in the three training pipelines
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")
JPEG_QUALITY = 90
IMAGENET_SIZE, ADE20K_SIZE = (500, 375), (683, 512)  # (width, height), landscape; every fourth image is portrait
CLASSES = 10  # ImageNet-like class folders
ADE20K_CLASSES = 150


# ---------------------------------------------------------------------------------------------------------------
# The data the benchmark writes
# ---------------------------------------------------------------------------------------------------------------


def photographs() -> list[np.ndarray]:
    """The colour photographs bundled with scikit-image, H×W×3 uint8."""
    import skimage.data

    return [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]


def natural_image(rng: np.random.Generator, photos: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """A random crop (half to all of the largest crop of this aspect ratio) of a random photograph, resized to
    ``width``×``height``, maybe mirrored, with a colour cast and sensor noise (σ 3 grey levels)."""
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    side = min(pw / width, ph / height) * rng.uniform(0.5, 1.0)
    cw, ch = max(1, int(width * side)), max(1, int(height * side))
    x, y = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
    image = cv2.resize(photo[y : y + ch, x : x + cw], (width, height), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    noisy = image * rng.uniform(0.85, 1.15, 3) + rng.normal(0, 3, image.shape)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _size(index: int, landscape: tuple[int, int]) -> tuple[int, int]:
    return landscape if index % 4 else landscape[::-1]


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


def write_imagenet(root: Path, images: int, seed: int, photos: Sequence[np.ndarray]) -> None:
    """``root/train/<class>/*.JPEG``: ``images`` ImageNet-like JPEGs in :data:`CLASSES` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        width, height = _size(i, IMAGENET_SIZE)
        _save_jpeg(natural_image(rng, photos, width, height), root / "train" / f"n{i % CLASSES:08d}" / f"{i:06d}.JPEG")


def polygon(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """A star-shaped polygon of 12-40 vertices inside an xyxy box, as COCO's flat [x0, y0, x1, y1, ...]."""
    n = int(rng.integers(12, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.6, 1.0, n)
    centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2
    points = centre + half * radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    return points.round(2).ravel().tolist()


def coco_annotation(rng: np.random.Generator, box: np.ndarray, height: int, width: int, crowd: bool) -> dict:
    """An object in ``box``: a polygon, or (every fourth object, and crowds) a compressed RLE of an ellipse."""
    from pycocotools import mask as mask_utils

    if crowd or rng.random() < 0.25:
        rle = mask_utils.encode(np.asfortranarray(ellipse_mask(box, height, width).astype(np.uint8)))
        segmentation: Any = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = [polygon(rng, box)]
    x0, y0, x1, y1 = box.tolist()
    return {"category_id": int(rng.integers(1, 81)), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(crowd),
            "area": (x1 - x0) * (y1 - y0), "segmentation": segmentation}  # fmt: skip


def write_coco(root: Path, images: int, seed: int, photos: Sequence[np.ndarray]) -> None:
    """``root/train2017/*.jpg`` at COCO's image sizes and ``root/annotations/instances_train2017.json``: 1-13 objects
    an image (7 on average, as COCO), every tenth image with a crowd region too."""
    rng = np.random.default_rng(seed)
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = COCO_SIZES[rng.integers(len(COCO_SIZES))]
        name = f"{image_id:012d}.jpg"
        _save_jpeg(natural_image(rng, photos, width, height), root / "train2017" / name)
        entries.append({"id": image_id, "file_name": name, "height": height, "width": width})
        objects = int(rng.integers(1, 14))
        for k, box in enumerate(random_boxes(rng, objects + (image_id % 10 == 0), width, height)):
            ann = coco_annotation(rng, box, height, width, crowd=k == objects)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    dataset = {"images": entries, "annotations": annotations,
               "categories": [{"id": i, "name": f"class_{i}"} for i in range(1, 81)]}  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(dataset))


def region_labels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An H×W uint8 label map of 6-20 regions (the Voronoi cells of random points), classes 0..150 (0: other)."""
    points = rng.uniform(0, 1, (int(rng.integers(6, 21)), 2)) * (height, width)
    classes = rng.integers(0, ADE20K_CLASSES + 1, len(points)).astype(np.uint8)
    ys, xs = np.mgrid[0:height:4, 0:width:4]  # cells on a 4-px grid, then blown up: cheap, still blocky edges
    nearest = np.argmin((ys[..., None] - points[:, 0]) ** 2 + (xs[..., None] - points[:, 1]) ** 2, axis=-1)
    return cv2.resize(classes[nearest], (width, height), interpolation=cv2.INTER_NEAREST)


def write_ade20k(root: Path, images: int, seed: int, photos: Sequence[np.ndarray]) -> None:
    """``root/images/training/*.jpg`` (683×512, every fourth portrait) and ``root/annotations/training/*.png``; the
    validation folders link to the training ones (the datamodule reads both)."""
    rng = np.random.default_rng(seed)
    (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        width, height = _size(i, ADE20K_SIZE)
        _save_jpeg(natural_image(rng, photos, width, height), root / "images" / "training" / f"ADE_train_{i:08d}.jpg")
        label = Image.fromarray(region_labels(rng, height, width), mode="L")
        label.save(root / "annotations" / "training" / f"ADE_train_{i:08d}.png")
    for folder in ("images", "annotations"):
        if not (root / folder / "validation").exists():
            (root / folder / "validation").symlink_to("training")


WRITERS: dict[str, Callable[[Path, int, int, Sequence[np.ndarray]], None]] = {
    "imagenet": write_imagenet, "coco": write_coco, "ade20k": write_ade20k,
}  # fmt: skip


def write_data(root: Path, images: int, seed: int) -> dict[str, Path]:
    """Each layout's folder under ``root``, written unless a ``done`` file says it holds these ``images`` already."""
    folders = {name: root / f"{name}-{images}-{seed}" for name in WRITERS}
    missing = [name for name, folder in folders.items() if not (folder / "done").is_file()]
    photos = photographs() if missing else []
    for name in missing:
        WRITERS[name](folders[name], images, seed, photos)
        (folders[name] / "done").write_text("")
    return folders


# ---------------------------------------------------------------------------------------------------------------
# The two sides of each pipeline: ``index -> sample``
# ---------------------------------------------------------------------------------------------------------------

Sample = Callable[[int], Any]


def _training_reader(dataset: Any) -> Sample:
    """A training set read as the training loader reads it: reseeded per sample from (seed, epoch, index)."""
    from swin.data.samplers import SeededSamples

    seeded = SeededSamples(dataset, seed=0)
    return lambda i: seeded[(0, i)]


def ours(pipeline: str, folders: dict[str, Path]) -> tuple[Sample, int]:
    """This project's dataset of ``pipeline`` on the written data (the datamodules' defaults: the recipes) and its
    length."""
    if pipeline in ("classification", "evaluation"):
        from swin.data.imagenet import ImageNetDataModule

        module = ImageNetDataModule(str(folders["imagenet"]), val_split="train")
        module.setup("fit")
        dataset = module.datasets["train" if pipeline == "classification" else "val"]
        return (_training_reader(dataset) if pipeline == "classification" else dataset.__getitem__), len(dataset)
    if pipeline == "detection":
        from swin.data.coco import COCODataModule

        module = COCODataModule(str(folders["coco"]), val_ann="annotations/instances_train2017.json",
                                val_images="train2017")  # fmt: skip
    else:
        from swin.data.ade20k import ADE20KDataModule

        module = ADE20KDataModule(str(folders["ade20k"]))
    module.setup("fit")
    return _training_reader(module.datasets["train"]), len(module.datasets["train"])


def timm_classification(folder: Path, train: bool) -> Sample:
    """timm's training (or evaluation) transform on ``Image.open(f).convert("RGB")``, as its ``ImageDataset`` reads."""
    from timm.data import create_transform

    paths = sorted((folder / "train").rglob("*.JPEG"))
    if train:
        transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                                     interpolation="bicubic")  # fmt: skip
    else:
        transform = create_transform(224, is_training=False, interpolation="bicubic", crop_pct=0.875)

    def sample(index: int) -> torch.Tensor:
        while True:
            try:
                with Image.open(paths[index]) as image:
                    return transform(image.convert("RGB"))
            except ValueError as error:  # timm's PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits, which
                if "bits" not in str(error):  # Pillow 13 refuses: a rare draw, drawn again, its time counted
                    raise

    return sample


def torchvision_detection(folder: Path) -> Sample:
    """torchvision ``transforms.v2`` on the COCO training images with pycocotools' masks (crowds left out)."""
    from pycocotools.coco import COCO
    from torchvision import tv_tensors
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "loading annotations..."
        coco = COCO(str(folder / "annotations" / "instances_train2017.json"))
    ids = [i for i in sorted(coco.imgs) if coco.getAnnIds(imgIds=i, iscrowd=False)]
    transform = v2.Compose([
        v2.RandomShortestSize(list(range(480, 801, 32)), 1333), v2.RandomHorizontalFlip(),
        v2.ConvertBoundingBoxFormat("XYXY"), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
    ])  # fmt: skip

    def sample(index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = coco.imgs[ids[index]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=False))
        image = tv_tensors.Image(decode_image(str(folder / "train2017" / info["file_name"])))
        target = {
            "boxes": tv_tensors.BoundingBoxes([a["bbox"] for a in anns], format="XYWH", canvas_size=image.shape[-2:]),
            "masks": tv_tensors.Mask(torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]))),
            "labels": torch.tensor([a["category_id"] for a in anns]),
        }
        return transform(image, target)

    return sample


def torchvision_segmentation(folder: Path) -> Sample:
    """torchvision ``transforms.v2`` on the ADE20K training pairs, label 0 ignored as ``reduce_zero_label`` does."""
    from torchvision import tv_tensors
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    from swin.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    images = sorted((folder / "images" / "training").glob("*.jpg"))
    transform = v2.Compose([
        v2.ScaleJitter((512, 2048), scale_range=(0.5, 2.0)),
        v2.RandomCrop(512, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 180),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip

    def sample(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = images[index]
        image = tv_tensors.Image(decode_image(str(path)))
        label = decode_image(str(folder / "annotations" / "training" / f"{path.stem}.png"))[0] - 1  # 0 -> 255
        return transform(image, tv_tensors.Mask(label))

    return sample


def peer(pipeline: str, folders: dict[str, Path]) -> Sample:
    """The peer's pipeline (:data:`PEERS`) on the same files as :func:`ours`."""
    if pipeline in ("classification", "evaluation"):
        return timm_classification(folders["imagenet"], train=pipeline == "classification")
    if pipeline == "detection":
        return torchvision_detection(folders["coco"])
    return torchvision_segmentation(folders["ade20k"])


# ---------------------------------------------------------------------------------------------------------------
# Timing and the report
# ---------------------------------------------------------------------------------------------------------------


def image_of(sample: Any) -> torch.Tensor:
    """The image tensor of either side's sample (a dict, an (image, target) tuple or a tensor)."""
    if isinstance(sample, dict):
        return sample["image"]
    return sample[0] if isinstance(sample, tuple) else sample


def cycling(sample: Sample, count: int, chunk: int) -> Callable[[], None]:
    """A step that reads the next ``chunk`` images of ``range(count)``, round and round."""
    position = itertools.count()

    def step() -> None:
        for _ in range(chunk):
            sample(next(position) % count)

    return step


def measure(pipeline: str, folders: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Both sides of ``pipeline`` in alternating steps: images/s per worker (median, min-max), the ratio, the goal."""
    mine, count = ours(pipeline, folders)
    theirs = peer(pipeline, folders)
    first = {"ours": image_of(mine(0)), PEERS[pipeline]: image_of(theirs(0))}
    chunk = min(args.chunk, count)
    times = time_alternating({"ours": cycling(mine, count, chunk), "peer": cycling(theirs, count, chunk)},
                             torch.device("cpu"), args.repeats, args.min_time, clock="cpu")  # fmt: skip
    rates = {side: [chunk / t for t in times[side]] for side in ("ours", "peer")}
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["peer"])
    goal = None if pipeline == "evaluation" else GOAL
    return {
        "pipeline": pipeline, "peer": PEERS[pipeline], "images": count, "chunk": chunk,
        **{f"{side}_images_per_s": statistics.median(r) for side, r in rates.items()},
        **{f"{side}_spread": [min(r), max(r)] for side, r in rates.items()},
        "ratio": ratio, "goal": goal, "met": None if goal is None else ratio >= goal,
        "outputs": {side: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for side, t in first.items()},
        "samples": rates,
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Input pipelines, images/s per loader worker (one process, one thread, CPU clock; median over "
        f"{report['repeats']} repeats, min-max in brackets); {machine_line(report['machine'])}",
        "",
        "| pipeline | ours img/s | peer | peer img/s | ours ÷ peer | goal | met |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        spread = {side: "{:.1f}-{:.1f}".format(*r[f"{side}_spread"]) for side in ("ours", "peer")}
        goal = f"≥ ×{r['goal']:.1f}" if r["goal"] else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['pipeline']} | {r['ours_images_per_s']:.1f} ({spread['ours']}) | {r['peer']} "
                     f"| {r['peer_images_per_s']:.1f} ({spread['peer']}) | ×{r['ratio']:.2f} | {goal} | {met} |")
    lines += ["", f"Decoder (ours): {report['decoder']}.", "", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench --data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="images of each layout the benchmark writes")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side")
    parser.add_argument("--min-time", type=float, default=2.0, help="CPU seconds per side and round, at least")
    parser.add_argument("--chunk", type=int, default=10, help="consecutive images per timed step")
    parser.add_argument("--pipelines", type=name_list(PIPELINES), default=list(PIPELINES), help=",".join(PIPELINES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 images, 2 repeats, no minimum time (the test)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-data"), help="for bench.json and bench.md")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/bench-data/data"),
                        help="where the generated images are written (kept for the next run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.min_time, args.chunk = 8, 2, 0.0, 2
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from swin.data.io import DECODER

    report: dict[str, Any] = {
        "machine": machine(), "command": "python -m swin.bench --data " + " ".join(argv), "repeats": args.repeats,
        "decoder": DECODER, "rows": [], "errors": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folders = write_data(args.data_dir, args.images, args.seed)
    report["data_seconds"] = time.perf_counter() - start

    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
        (args.out / "bench.md").write_text(markdown(report))

    for pipeline in args.pipelines:
        section(report, pipeline, lambda p=pipeline: report["rows"].append(measure(p, folders, args)), save)
    print(markdown(report))
    return report
