"""COCO reading: polygon and RLE masks, contiguous labels, crowd and empty images, the training resize, bad input."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from swin.data.coco import COCODataModule, ShorterSideResize

H, W = 48, 64
CATEGORIES = [{"id": 11, "name": "kite"}, {"id": 2, "name": "bicycle"}, {"id": 7, "name": "train"}]  # unsorted, gaps


def rect(y0, y1, x0, x1):
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed_rle(mask):
    flat = mask.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    return {"size": [H, W], "counts": [*runs, count]}


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def ann(id, image_id, category_id, bbox, segmentation, iscrowd=0):
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "segmentation": segmentation, "iscrowd": iscrowd, "area": float(bbox[2] * bbox[3])}  # fmt: skip


def coco_json():
    """Image 1: a polygon, a compressed RLE, a crowd and a degenerate box; 2: empty; 3: only a crowd; 4: raw RLE."""
    images = [{"id": i, "file_name": f"{i:04d}.jpg", "height": H, "width": W} for i in (1, 2, 3, 4)]
    annotations = [
        ann(1, 1, 7, [10, 10, 20, 20], [[10, 10, 30, 10, 30, 30, 10, 30]]),
        ann(2, 1, 2, [40, 5, 20, 10], compressed_rle(rect(5, 15, 40, 60))),
        ann(3, 1, 11, [0, 35, 20, 10], uncompressed_rle(rect(35, 45, 0, 20)), iscrowd=1),
        ann(4, 3, 2, [5, 5, 10, 10], uncompressed_rle(rect(5, 15, 5, 15)), iscrowd=1),
        ann(5, 1, 7, [50, 40, 0, 5], [[50, 40, 51, 40, 51, 45]]),
        ann(6, 4, 11, [20, 8, 30, 24], uncompressed_rle(rect(8, 32, 20, 50))),
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def sample_pair(sample: dict) -> tuple:
    """A detection sample's image and target."""
    assert set(sample) == {"image", "target", "image_id", "path"}
    return sample["image"], sample["target"]


def write_tree(root, data=None, skip_images=()):
    data = data or coco_json()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(exist_ok=True)
        for img in data["images"]:
            if img["file_name"] not in skip_images:
                pixels = rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / f"{split}2017" / img["file_name"])
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def datamodule(root, **kwargs):
    return COCODataModule(root=str(root), num_workers=0, batch_size=2, **kwargs)


def test_categories_map_to_contiguous_labels_in_id_order(tmp_path):
    dm = datamodule(write_tree(tmp_path))
    assert dm.num_classes == 3
    assert dm.category_ids == [2, 7, 11]
    assert dm.class_names == ["bicycle", "train", "kite"]


def test_training_targets_skip_crowds_degenerate_boxes_and_empty_images(tmp_path):
    dm = datamodule(write_tree(tmp_path), train_sizes=[H], max_size=W, hflip=0.0)
    with pytest.warns(UserWarning, match=r"1 annotations have a degenerate box.*ids \[5\]"):
        dm.setup("fit")
    train = dm.datasets["train"]
    assert train.ids == [1, 4]  # 2 has no objects, 3 only a crowd
    image, target = sample_pair(train[0])
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["labels"].tolist() == [2, 1]  # category 7 → label 2, category 2 → label 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 30, 30], [40, 5, 60, 15]]))
    polygon, rle = target["masks"].numpy()
    np.testing.assert_array_equal(rle, rect(5, 15, 40, 60))
    ys, xs = np.nonzero(polygon)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (10, 30, 10, 30) and target["masks"].dtype == torch.uint8
    _, target = sample_pair(train[1])  # an uncompressed (non-crowd) RLE
    assert target["labels"].tolist() == [3]
    np.testing.assert_array_equal(target["masks"][0].numpy(), rect(8, 32, 20, 50))


def test_evaluation_keeps_every_image_crowds_and_areas(tmp_path):
    dm = datamodule(write_tree(tmp_path))
    dm.setup("validate")
    val = dm.datasets["val"]
    assert val.ids == [1, 2, 3, 4]
    assert val[0]["image_id"] == 1 and val[0]["path"] == str(dm.root / "val2017" / "0001.jpg")
    _, target = sample_pair(val[0])
    assert target["iscrowd"].tolist() == [0, 0, 1, 0]
    assert target["labels"].tolist() == [2, 1, 3, 2]
    np.testing.assert_array_equal(target["masks"][2].numpy(), rect(35, 45, 0, 20))
    torch.testing.assert_close(target["area"], torch.tensor([400.0, 200, 200, 0]))
    _, empty = sample_pair(val[1])
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, H, W)


def test_multi_scale_resize_caps_the_longer_side():
    image = np.zeros((100, 300, 3), np.uint8)
    out = ShorterSideResize([80], max_size=1000)(image=image)["image"]
    assert out.shape[:2] == (80, 240)
    out = ShorterSideResize([80], max_size=200)(image=image)["image"]
    assert out.shape[:2] == (67, 200)


def test_training_resize_and_flip_move_boxes_and_masks_together(tmp_path):
    dm = datamodule(write_tree(tmp_path), train_sizes=[96], max_size=1333, hflip=1.0)
    dm.setup("fit")
    image, target = sample_pair(dm.datasets["train"][0])
    assert image.shape == (3, 96, 128)
    torch.testing.assert_close(target["boxes"], torch.tensor([[68.0, 20, 108, 60], [8, 10, 48, 30]]))
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert (mask_box - box).abs().max() <= 2.0


def test_crop_policy_drops_cropped_objects_with_their_masks(tmp_path):
    dm = datamodule(write_tree(tmp_path), train_sizes=[48], crop_prob=1.0, crop_resize=[48], crop_size=(16, 24))
    dm.setup("fit")
    counts = set()
    for _ in range(30):
        image, target = sample_pair(dm.datasets["train"][0])
        assert min(image.shape[1:]) == 48 and len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        counts.add(len(target["labels"]))
        for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert (mask_box - box).abs().max() <= 3.0 and label in (1, 2)
    assert {0, 1} <= counts  # objects leave (with their masks) when the crop misses them


def test_batches_are_dicts_of_lists_of_variable_size_images(tmp_path):
    dm = datamodule(write_tree(tmp_path), train_sizes=[48, 96], max_size=1333)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "target", "image_id", "path"} and batch["image_id"] == [1, 2]
    assert [tuple(i.shape) for i in batch["image"]] == [(3, H, W)] * 2
    assert [len(t["labels"]) for t in batch["target"]] == [4, 0]


def test_synthetic_data_is_written_on_first_use(tmp_path):
    kwargs = {"num_train": 8, "num_val": 2, "image_size": 32}
    dm = datamodule(tmp_path / "coco", synthetic=True, synthetic_kwargs=kwargs)
    assert dm.num_classes == 5 and len(set(dm.category_ids)) == 5
    dm.setup("fit")
    assert 0 < len(dm.datasets["train"]) < 8 and len(dm.datasets["val"]) == 2


# -- bad input ---------------------------------------------------------------------------------------------------


def broken(mutate):
    data = copy.deepcopy(coco_json())
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][1].update(image_id=99), r"annotation id 2 points at image id 99"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotation id 1 needs"),
        (lambda d: d["annotations"][0].update(category_id=5), r"annotation id 1 has category id 5"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1: bbox must be"),
        (lambda d: d["annotations"][1]["segmentation"].update(size=[10, 10]), r"annotation id 2: RLE size"),
        (lambda d: d["annotations"][2]["segmentation"]["counts"].append(5), r"annotation id 3: uncompressed RLE"),
        (lambda d: d["annotations"][0].update(segmentation="x"), r"annotation id 1: segmentation must be"),
        (lambda d: d.pop("categories"), r"missing or malformed 'categories'"),
    ],
)
def test_malformed_annotations_name_the_file_and_annotation(tmp_path, mutate, message):
    dm = datamodule(write_tree(tmp_path, broken(mutate)))
    with pytest.raises(ValueError, match=message) as err:
        dm.num_classes
    assert "instances_val2017.json" in str(err.value)


def test_missing_or_invalid_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither COCO annotation file .*instances_val2017.json nor .*train"):
        datamodule(tmp_path).num_classes
    write_tree(tmp_path)
    (tmp_path / "annotations" / "instances_train2017.json").write_text('{"images": [')
    dm = datamodule(tmp_path)
    assert dm.num_classes == 3  # the class list comes from the validation file
    with pytest.raises(ValueError, match=r"instances_train2017.json is not valid JSON"):
        dm.setup("fit")


def test_missing_image_file_is_named_before_loading(tmp_path):
    dm = datamodule(write_tree(tmp_path, skip_images=("0003.jpg",)))
    with pytest.raises(FileNotFoundError, match=r"train2017/0003.jpg \(image id 3\) does not exist"):
        dm.setup("fit")


def test_image_of_another_size_than_annotated_is_named(tmp_path):
    write_tree(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "val2017" / "0002.jpg")
    dm = datamodule(tmp_path)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"0002.jpg is 10x10 pixels, its annotation file says 64x48"):
        dm.datasets["val"][1]


def test_category_only_in_validation_is_a_counted_warning(tmp_path):
    write_tree(tmp_path)
    train = coco_json()
    train["annotations"] = [a for a in train["annotations"] if a["category_id"] != 11 or a["iscrowd"]]  # crowds only
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    dm = datamodule(tmp_path, train_sizes=[H], max_size=W)
    with pytest.warns(UserWarning, match=r"instances_val2017.json: 1 category annotated in validation but never in "
                      r".*instances_train2017.json.*'kite' \(id 11, 2\)"):
        dm.setup("fit")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*annotated in validation but never")
        datamodule(write_tree(tmp_path / "same"), train_sizes=[H], max_size=W).setup("fit")
