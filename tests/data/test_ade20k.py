import numpy as np
import pytest
import torch
from PIL import Image

from swin.data import shapes
from swin.data.ade20k import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    ADE20KDataModule,
    CatMaxRatioCrop,
    fit_size,
    label_classes,
    paired_files,
    read_label,
)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    shapes.write_ade20k(root, num_train=3, num_val=2, image_size=(40, 48))
    return root


def copy_tree(src, dst):
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    return dst


def datamodule(root, **kwargs):
    defaults = dict(num_classes=5, batch_size=2, num_workers=0, crop_size=32, base_size=(64, 32))
    return ADE20KDataModule(str(root), **{**defaults, **kwargs})


def test_reduce_zero_label(tmp_path):
    raw = np.array([[0, 1, 2], [5, 255, 3]], np.uint8)
    Image.fromarray(raw).save(tmp_path / "a.png")
    label = read_label(tmp_path / "a.png", num_classes=5)
    np.testing.assert_array_equal(label, [[255, 0, 1], [4, 255, 2]])
    np.testing.assert_array_equal(read_label(tmp_path / "a.png", 6, reduce_zero_label=False), raw)


def test_class_names():
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert ADE20KDataModule().class_names == ADE20K_CLASSES
    assert ADE20KDataModule(synthetic=True).class_names == shapes.SHAPE_CLASSES
    dm = ADE20KDataModule(num_classes=3)
    assert (dm.num_classes, dm.class_names) == (3, ["class_0", "class_1", "class_2"])
    assert ADE20KDataModule(class_names=["a", "b"]).num_classes == 2
    with pytest.raises(ValueError, match="2 class_names"):
        ADE20KDataModule(num_classes=3, class_names=["a", "b"])


def test_keep_ratio_size_follows_mmcv():
    assert fit_size(512, 683, (2048, 512)) == (512, 683)  # short side bound
    assert fit_size(683, 512, (2048, 512)) == (683, 512)  # orientation does not matter
    assert fit_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound


def test_train_batches_are_cropped_and_padded_with_ignore(ade_root):
    dm = datamodule(ade_root, crop_size=(48, 64), base_size=(48, 40), scale_range=(1.0, 1.0), photometric=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 48, 64) and batch["mask"].shape == (2, 48, 64)
    assert batch["mask"].dtype == torch.int64
    assert (batch["mask"][:, 40:] == IGNORE_INDEX).all() and (batch["mask"][:, :, 48:] == IGNORE_INDEX).all()
    assert (batch["image"][:, :, 40:] == 0).all()  # padded after normalisation
    assert batch["mask"][:, :40, :48].lt(5).any()


def test_eval_keeps_the_annotation_size(ade_root):
    dm = datamodule(ade_root, base_size=(60, 20), eval_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert [tuple(x.shape) for x in batch["image"]] == [(3, 20, 24)] * 2  # keep ratio into 60×20
    assert [tuple(m.shape) for m in batch["mask"]] == [(40, 48)] * 2
    expected = read_label(paired_files(ade_root, "validation")[0][1], 5)
    np.testing.assert_array_equal(batch["mask"][0].numpy(), expected)


def test_cat_max_ratio_prefers_mixed_crops():
    mask = np.zeros((20, 100), np.uint8)
    mask[:, 50:] = 1

    def mixed_fraction(ratio):
        crop = CatMaxRatioCrop((20, 20), cat_max_ratio=ratio)
        crop.set_random_seed(0)
        mixed = 0
        for _ in range(200):
            box = crop.get_params_dependent_on_data({"shape": mask.shape}, {"mask": mask})["box"]
            counts = np.bincount(crop.apply_to_mask(mask, box).ravel(), minlength=2)
            mixed += counts.max() / counts.sum() < 0.75
        return mixed / 200

    assert mixed_fraction(1.0) < 0.3 < 0.5 < mixed_fraction(0.75)


def test_synthetic_data_is_written_on_first_use(tmp_path):
    root = tmp_path / "demo" / "ade20k"
    dm = ADE20KDataModule(str(root), synthetic=True, synthetic_kwargs=dict(num_train=2, num_val=1, image_size=32))
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 1 and len(paired_files(root, "training")) == 2


def test_predict_on_a_folder(ade_root):
    dm = datamodule(ade_root, predict_root=str(ade_root / "images" / "training"), base_size=(24, 20))
    dm.setup("predict")
    sample = dm.datasets["predict"][0]
    assert sample["image"].shape == (3, 20, 24) and sample["size"].tolist() == [40, 48]
    assert sample["path"] == str(ade_root / "images" / "training" / "ADE_train_00000001.jpg")


def test_image_without_annotation(ade_root, tmp_path):
    root = copy_tree(ade_root, tmp_path / "ade")
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="without an annotation.*ADE_train_00000002.jpg"):
        datamodule(root).setup("fit")


def test_annotation_without_image(ade_root, tmp_path):
    root = copy_tree(ade_root, tmp_path / "ade")
    (root / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="without an image.*ADE_val_00000001.png"):
        datamodule(root).setup("validate")


def test_annotation_of_another_size(ade_root, tmp_path):
    root = copy_tree(ade_root, tmp_path / "ade")
    Image.fromarray(np.ones((40, 40), np.uint8)).save(root / "annotations" / "validation" / "ADE_val_00000002.png")
    dm = datamodule(root)
    dm.setup("validate")
    with pytest.raises(ValueError, match="ADE_val_00000002.png is 40×40"):
        dm.datasets["val"][1]


@pytest.mark.parametrize("value", [6, 200])
def test_labels_out_of_range(ade_root, tmp_path, value):
    root = copy_tree(ade_root, tmp_path / "ade")
    path = root / "annotations" / "training" / "ADE_train_00000001.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = value
    Image.fromarray(label).save(path)
    match = rf"ADE_train_00000001.png holds labels \[{value}\] outside 0..5"
    dm = datamodule(root)
    dm.setup("validate")  # the training annotations are not read for validation
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")  # every training annotation is checked before the first step
    with pytest.raises(ValueError, match=match):
        read_label(path, 5)


def test_label_classes_are_those_of_the_decoded_annotation(ade_root):
    for _, label_path in paired_files(ade_root, "training") + paired_files(ade_root, "validation"):
        label = read_label(label_path, 5)
        assert label_classes(label_path, 5) == set(np.unique(label).tolist()) - {IGNORE_INDEX}


def test_class_only_in_validation_is_a_counted_warning(ade_root, tmp_path):
    root = copy_tree(ade_root, tmp_path / "ade")
    train = [read_label(p, 5) for _, p in paired_files(root, "training")]
    absent = sorted(set(range(5)) - set(np.unique(np.stack(train)).tolist()))
    if not absent:  # make one class validation-only: relabel it to "other" (0) in every training annotation
        absent = [4]
        for _, path in paired_files(root, "training"):
            raw = np.asarray(Image.open(path)).copy()
            raw[raw == 5] = 0
            Image.fromarray(raw).save(path)
    path = root / "annotations" / "validation" / "ADE_val_00000001.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[:4, :4] = absent[0] + 1  # stored as class + 1 (reduce_zero_label)
    Image.fromarray(raw).save(path)
    with pytest.warns(UserWarning, match=rf"class\(es\) appear in validation annotations but in no training.*{absent[0]} "):
        datamodule(root).setup("fit")


def test_colour_annotation_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png has mode RGB"):
        read_label(tmp_path / "rgb.png", 5)
