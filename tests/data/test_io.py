"""One image reader, one list of extensions and one predict folder, shared by the three tasks."""

import numpy as np
import pytest
import torch
from PIL import Image

from swin.data import ADE20KDataModule, COCODataModule, ImageNetDataModule
from swin.data.io import IMAGE_EXTENSIONS, PredictFolder, collate_lists, list_images, read_image
from swin.data.transforms import classification_transforms


def _save(path, mode="RGB", size=(24, 20), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)


@pytest.fixture
def folder(tmp_path):
    """Every extension in upper or lower case, in sub-folders, plus files and folders that must be ignored."""
    root = tmp_path / "images"
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        _save(root / ("sub" if i % 2 else "") / f"im{i}{ext.upper() if i % 3 == 0 else ext}", size=(24 + i, 20))
    _save(root / "grey.png", mode="L")
    (root / "notes.txt").write_text("not an image")
    _save(root / ".thumbnails" / "hidden.jpg")
    return root


def test_list_images_is_recursive_sorted_and_any_case(folder):
    found = list_images(folder)
    assert found == sorted(found)
    assert len(found) == len(IMAGE_EXTENSIONS) + 1  # every extension once, plus the grey PNG
    assert {p.suffix.lower() for p in found} == set(IMAGE_EXTENSIONS)
    assert not any(".thumbnails" in p.parts or p.suffix == ".txt" for p in found)


def test_read_image_gives_rgb_uint8_and_names_bad_files(folder, tmp_path):
    grey = read_image(folder / "grey.png")
    assert grey.shape == (20, 24, 3) and grey.dtype == np.uint8 and (grey == 100).all()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        read_image(bad)
    with pytest.raises(ValueError, match=r"grey.png is 24x20 pixels, its annotation file says 30x20"):
        read_image(folder / "grey.png", expected_hw=(20, 30))


def test_predict_folder_samples_and_lists_batches(folder):
    dataset = PredictFolder(folder, classification_transforms(16, train=False))
    assert [str(p) for p in dataset.paths] == [str(p) for p in list_images(folder)]
    sample = dataset[0]
    assert set(sample) == {"image", "path", "size"} and sample["image"].shape == (3, 16, 16)
    assert sample["size"].tolist() == list(read_image(sample["path"]).shape[:2])
    batch = collate_lists([dataset[0], dataset[1]])
    assert batch["path"] == [str(dataset.paths[0]), str(dataset.paths[1])] and len(batch["image"]) == 2
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        PredictFolder(folder / "missing", classification_transforms(16, train=False))
    empty = folder.parent / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing to predict")
    with pytest.raises(FileNotFoundError, match="no images"):
        PredictFolder(empty, classification_transforms(16, train=False))


@pytest.mark.parametrize(
    "datamodule",
    [
        lambda f: ImageNetDataModule(root=str(f), image_size=16, batch_size=2, num_workers=0, predict_root=str(f)),
        lambda f: COCODataModule(root=str(f), batch_size=2, num_workers=0, predict_root=str(f)),
        lambda f: ADE20KDataModule(root=str(f), batch_size=2, num_workers=0, predict_root=str(f), num_classes=3),
    ],
    ids=["classification", "detection", "segmentation"],
)
def test_every_datamodule_predicts_on_the_same_files(folder, datamodule):
    dm = datamodule(folder)
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    assert isinstance(dataset, PredictFolder) and dataset.paths == list_images(folder)
    batch = next(iter(dm.predict_dataloader()))
    count = dm.eval_batch_size
    assert batch["path"] == [str(p) for p in list_images(folder)[:count]]
    assert [tuple(s) for s in batch["size"]] == [read_image(p).shape[:2] for p in list_images(folder)[:count]]
    images = batch["image"]
    assert (images.shape[0] if torch.is_tensor(images) else len(images)) == count
