import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from swin.data import shapes
from swin.data.shapes import COCO_CATEGORY_IDS, SHAPE_CLASSES


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_scene_occlusion_cuts_earlier_masks():
    rng = np.random.default_rng(3)
    objects = [(k % len(SHAPE_CLASSES), 0.35) for k in range(6)]  # large objects: they must overlap
    image, instances = shapes.render_scene(rng, (48, 64), objects)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert [cls for cls, _ in instances] == [cls for cls, _ in objects]
    masks = np.stack([mask for _, mask in instances])
    assert masks.shape == (6, 48, 64) and masks.dtype == bool
    assert masks.sum(0).max() == 1  # visible masks never overlap
    assert masks[-1].sum() > 0.5 * np.pi * (0.35 * 48) ** 2 * 0.4  # the last object is whole
    assert 0 < masks.any(0).sum() < 48 * 64


def test_objects_are_brighter_than_their_background():
    for seed in range(20):
        image, instances = shapes.render_scene(np.random.default_rng(seed), 48, [(seed % len(SHAPE_CLASSES), 0.3)])
        luminance = image.astype(float) @ [0.299, 0.587, 0.114]
        (_, mask), = instances
        assert luminance[mask].mean() > luminance[~mask].mean() + 40


def test_shape_classes_are_distinct_outlines():
    outlines = [shapes.shape_polygon(cls, 50, 50, 40, 0.0) for cls in range(len(SHAPE_CLASSES))]
    areas = [shapes._polygon_mask(o, 100, 100).sum() for o in outlines]
    assert len(set(len(o) for o in outlines)) == len(outlines)  # vertex counts differ: 48, 4, 3, 10, 12
    assert all(a > 1000 for a in areas)


def test_imagefolder_layout_and_determinism(tmp_path):
    shapes.write_imagefolder(tmp_path / "a", num_train=3, num_val=2, image_size=40, seed=1)
    shapes.write_imagefolder(tmp_path / "b", num_train=3, num_val=2, image_size=40, seed=1)
    shapes.write_imagefolder(tmp_path / "c", num_train=3, num_val=2, image_size=40, seed=2)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == sorted(SHAPE_CLASSES)
        for name in SHAPE_CLASSES:
            files = sorted((tmp_path / "a" / split / name).iterdir())
            assert len(files) == count
            with Image.open(files[0]) as image:
                assert image.size == (40, 40) and image.mode == "RGB"
    # per-image seeding: more images per class leaves the existing ones unchanged
    shapes.write_imagefolder(tmp_path / "d", num_train=4, num_val=2, image_size=40, seed=1)
    d = _tree(tmp_path / "d")
    assert all(d[k] == v for k, v in a.items())


def test_coco_annotations(tmp_path):
    shapes.write_coco(tmp_path / "coco", num_train=12, num_val=8, image_size=(56, 72), seed=0)
    shapes.write_coco(tmp_path / "again", num_train=12, num_val=8, image_size=(56, 72), seed=0)
    assert _tree(tmp_path / "coco") == _tree(tmp_path / "again")

    image_ids = set()
    for split, count in (("train", 12), ("val", 8)):
        path = tmp_path / "coco" / "annotations" / f"instances_{split}2017.json"
        coco = COCO(str(path))
        raw = json.loads(path.read_text())
        assert [c["id"] for c in raw["categories"]] == COCO_CATEGORY_IDS
        assert [c["name"] for c in raw["categories"]] == SHAPE_CLASSES
        assert len(raw["images"]) == count
        for info in raw["images"]:
            with Image.open(tmp_path / "coco" / f"{split}2017" / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]) == (72, 56)
        image_ids |= {info["id"] for info in raw["images"]}
        assert any(not coco.getAnnIds(imgIds=i) for i in coco.getImgIds())  # images without objects
        anns = raw["annotations"]
        assert len({a["id"] for a in anns}) == len(anns)
        kinds = {
            "polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__
            for a in anns
        }
        assert kinds == {"polygon", "str", "list"}
        assert any(a["iscrowd"] for a in anns)
        crowd = [a for a in anns if a["iscrowd"]]
        assert all(isinstance(a["segmentation"], dict) for a in crowd)
        per_image = {}
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            assert ann["area"] == pytest.approx(mask.sum(), abs=1)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            per_image.setdefault(ann["image_id"], []).append(mask)
        for masks in per_image.values():  # visible masks (the crowd's too) do not overlap
            assert np.stack(masks).sum(0).max() == 1
    assert len(image_ids) == 20  # unique across splits


def test_coco_masks_match_the_drawn_pixels(tmp_path):
    shapes.write_coco(tmp_path, num_train=6, num_val=0, image_size=64, seed=5)
    coco = COCO(str(tmp_path / "annotations" / "instances_train2017.json"))
    for i, image_id in enumerate(sorted(coco.getImgIds())):
        rng = shapes._rng(5, "coco", "train", i)
        objects = [] if i % 7 == 3 else shapes._scene_objects(rng, 5)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if i % 4 == 1 or not objects:
            continue
        _, instances = shapes.render_scene(rng, 64, objects)
        drawn = [(cls, mask) for cls, mask in instances if mask.sum() >= 4]
        assert [COCO_CATEGORY_IDS[cls] for cls, _ in drawn] == [a["category_id"] for a in anns]
        for (_, mask), ann in zip(drawn, anns):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)


def test_ade20k_layout(tmp_path):
    shapes.write_ade20k(tmp_path / "ade", num_train=5, num_val=3, image_size=48, seed=0)
    shapes.write_ade20k(tmp_path / "again", num_train=5, num_val=3, image_size=48, seed=0)
    assert _tree(tmp_path / "ade") == _tree(tmp_path / "again")
    seen = set()
    for folder, count in (("training", 5), ("validation", 3)):
        images = sorted((tmp_path / "ade" / "images" / folder).glob("*.jpg"))
        labels = sorted((tmp_path / "ade" / "annotations" / folder).glob("*.png"))
        assert len(images) == count and [p.stem for p in images] == [p.stem for p in labels]
        for path in labels:
            with Image.open(path) as label:
                assert label.mode == "L" and label.size == (48, 48)
                values = np.asarray(label)
            assert values.max() <= len(SHAPE_CLASSES)
            seen |= set(np.unique(values).tolist())
    assert 0 in seen and len(seen) > 2
    assert shapes.ADE20K_CLASSES == ["other", *SHAPE_CLASSES]


def test_ensure_is_atomic_under_a_race(tmp_path):
    root = tmp_path / "demo" / "shapes"
    ctx = mp.get_context("spawn")  # fresh interpreters: no fork of a process that has imported torch
    kwargs = {"num_train": 2, "num_val": 1, "image_size": 32}
    workers = [
        ctx.Process(target=shapes.ensure, args=(str(root), shapes.write_imagefolder), kwargs=kwargs) for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]  # no temp folders left
    assert len(list(root.rglob("*.JPEG"))) == 3 * len(SHAPE_CLASSES)

    calls = []
    assert shapes.ensure(root, lambda path, **kw: calls.append(path)) == root
    assert calls == []  # an existing root is left alone


def test_ensure_cleans_up_after_a_failing_writer(tmp_path):
    def broken(path, **kwargs):
        (Path(path) / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        shapes.ensure(tmp_path / "data", broken)
    assert list(tmp_path.iterdir()) == []
