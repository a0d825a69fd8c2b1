from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swin.data import ImageNetDataModule
from swin.data.shapes import SHAPE_CLASSES


def _write(path: Path, value: int, size=(20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path) -> Path:
    """train: cat (3 images, one in a sub-folder), dog (2); val: cat 1, dog 2; plus files that are not images."""
    root = tmp_path / "imagenet"
    _write(root / "train" / "dog" / "d1.JPEG", 200)
    _write(root / "train" / "dog" / "d2.png", 210)
    _write(root / "train" / "cat" / "c1.jpg", 10)
    _write(root / "train" / "cat" / "c2.JPG", 20)
    _write(root / "train" / "cat" / "more" / "c3.jpeg", 30)
    _write(root / "val" / "cat" / "v1.PNG", 15)
    _write(root / "val" / "dog" / "v2.jpg", 205)
    _write(root / "val" / "dog" / "v3.jpeg", 215)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "labels.csv").write_text("a,b")
    (root / "train" / "README").write_text("top-level file, not a class")
    (root / "train" / ".cache").mkdir()
    (root / "val" / ".cache").mkdir()
    return root


def _dm(root, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": 16, "batch_size": 2, "num_workers": 0, **kwargs}
    return ImageNetDataModule(root=str(root), **kwargs)


def test_classes_labels_and_batches(tree):
    dm = _dm(tree)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert [p.name for p in train.paths] == ["c1.jpg", "c2.JPG", "c3.jpeg", "d1.JPEG", "d2.png"]
    assert train.labels == [0, 0, 0, 1, 1] and val.labels == [0, 1, 1]
    sample = val[1]
    image, label = sample["image"], sample["label"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    assert sample["path"] == str(tree / "val" / "dog" / "v2.jpg")
    # a uniform grey 205 image normalises to (205/255 - mean) / std everywhere
    expected = (205 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(image.mean((1, 2)), expected, atol=0.03)
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["image"], batch["label"]
    assert x.shape == (2, 3, 16, 16) and y.dtype == torch.int64 and len(batch["path"]) == 2
    assert len(dm.train_dataloader()) == 2  # 5 images, batch 2, last partial batch dropped (timm's train loader)
    assert sum(len(b["label"]) for b in dm.val_dataloader()) == 3
    dm.setup("test")
    assert [len(b["label"]) for b in dm.test_dataloader()] == [2, 1]


def test_val_classes_must_match_train(tree):
    (tree / "val" / "cat" / "v1.PNG").rename(tree / "v1.PNG")
    (tree / "val" / "cat").rmdir()
    _write(tree / "val" / "bird" / "b.jpg", 90)
    dm = _dm(tree)
    with pytest.raises(ValueError, match=r"missing \['cat'\], extra \['bird'\]"):
        dm.setup("validate")


def test_class_folder_without_images_is_an_error(tree):
    (tree / "train" / "fish").mkdir()
    (tree / "train" / "fish" / "info.txt").write_text("no images here")
    dm = _dm(tree)
    with pytest.raises(FileNotFoundError, match="fish"):
        dm.setup("fit")


def test_images_directly_in_the_split_folder_are_named_in_the_error(tmp_path):
    for i in range(3):
        _write(tmp_path / "flat" / "train" / f"{i}.jpg", i)
    with pytest.raises(FileNotFoundError, match=r"(?s)no class folders in .*flat/train; 3 images lie directly in it"):
        _dm(tmp_path / "flat").num_classes


def test_fewer_images_than_a_batch_is_an_error_not_an_empty_epoch(tree):
    dm = ImageNetDataModule(str(tree), image_size=32, batch_size=6, num_workers=0, randaugment=False)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"has 5 usable images, fewer than batch_size 6 x 1 process"):
        dm.train_dataloader()


def test_missing_root_or_split_shows_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*train/<class>/<image>\.JPEG") as info:
        _dm(tmp_path / "nowhere").num_classes
    assert "val/<class>/<image>.JPEG" in str(info.value)
    _write(tmp_path / "only_train" / "train" / "a" / "x.jpg", 1)
    dm = _dm(tmp_path / "only_train")
    assert dm.class_names == ["a"]
    with pytest.raises(FileNotFoundError, match=r"(?s)only_train/val is not a folder.*val/<class>"):
        dm.setup("validate")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_error_names_the_file(tree, num_workers):
    bad = tree / "val" / "dog" / "v2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    dm = _dm(tree, num_workers=num_workers, batch_size=4)
    dm.setup("validate")
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        list(dm.val_dataloader())


def test_truncated_image_error_names_the_file(tree):
    bad = tree / "train" / "cat" / "c1.jpg"
    _write(bad, 10, size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:200])
    dm = _dm(tree)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        dm.datasets["train"][0]


def test_predict_batches_carry_paths(tree, tmp_path):
    folder = tmp_path / "to_predict"
    _write(folder / "b.png", 1)
    _write(folder / "nested" / "a.JPEG", 2)
    (folder / "nested" / "skip.txt").write_text("x")
    dm = _dm(tree, predict_root=str(folder), batch_size=4)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert batch["image"].shape == (2, 3, 16, 16)
    assert list(batch["path"]) == [str(folder / "b.png"), str(folder / "nested" / "a.JPEG")]
    assert batch["size"].tolist() == [[20, 24], [20, 24]]  # the files' own (H, W)
    with pytest.raises(ValueError, match="predict_root"):
        _dm(tree).setup("predict")
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        _dm(tree, predict_root=str(tmp_path / "missing")).setup("predict")


def test_synthetic_root_is_written_on_first_use(tmp_path):
    root = tmp_path / "demo" / "imagenet"
    dm = _dm(root, synthetic=True, synthetic_kwargs={"num_train": 2, "num_val": 1, "image_size": 24})
    assert not root.exists()
    assert dm.class_names == sorted(SHAPE_CLASSES)  # written on first access
    assert len(list((root / "train").rglob("*.JPEG"))) == 2 * len(SHAPE_CLASSES)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 * len(SHAPE_CLASSES) and len(dm.datasets["val"]) == len(SHAPE_CLASSES)
    assert sorted(set(dm.datasets["val"].labels)) == list(range(len(SHAPE_CLASSES)))
