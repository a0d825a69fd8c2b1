import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from swin.data import shapes
from swin.models import build_swin
from swin.models.weights import load_pretrained
from swin.tasks.segmentation import SegmentationTask

NUM_CLASSES = len(shapes.SHAPE_CLASSES)
BACKBONE = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, drop_path_rate=0.0)


def tiny_task(**kwargs) -> SegmentationTask:
    defaults = dict(backbone="custom", backbone_kwargs=BACKBONE, channels=16, aux_channels=8)
    return SegmentationTask(num_classes=NUM_CLASSES, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def fitted(run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    root = tmp / "ade20k"
    shapes.write_ade20k(root, num_train=4, num_val=2, image_size=(40, 48))
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "swin.writers.SegmentationWriter"}],
        },
        "model": {
            "class_path": "swin.tasks.segmentation.SegmentationTask",
            "init_args": {"backbone": "custom", "backbone_kwargs": BACKBONE, "channels": 16, "aux_channels": 8,
                          "lr": 1e-3, "warmup_steps": 1},
        },
        "data": {
            "class_path": "swin.data.ade20k.ADE20KDataModule",
            # eval images are resized to 20×24 while the annotations stay 40×48
            "init_args": {"root": str(root), "synthetic": True, "batch_size": 2, "num_workers": 0,
                          "crop_size": 32, "base_size": [24, 20], "scale_range": [0.5, 1.0]},
        },
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        run("fit", path, tmp, mp)
    return tmp, path


def test_fit_logs_metrics_and_saves_a_loadable_checkpoint(fitted):
    tmp, _ = fitted
    run_dir = tmp / "runs" / "fit" / "version_0"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val = [r for r in rows if r.get("val/miou")]
    assert len(val) == 1 and 0.0 <= float(val[0]["val/miou"]) <= 1.0 and 0 <= float(val[0]["val/pixel_acc"]) <= 1
    assert any(r.get("train/loss") for r in rows)
    checkpoints = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in checkpoints and any(n.startswith("best") for n in checkpoints)
    backbone = build_swin("custom", **BACKBONE, num_classes=None, out_indices=(0, 1, 2, 3))
    load_pretrained(backbone, run_dir / "checkpoints" / "last.ckpt", strict=True)


def numpy_miou(task: SegmentationTask, dataset, tta: bool) -> tuple[float, float, list[np.ndarray]]:
    """mIoU and pixel accuracy of ``task`` on ``dataset`` from a numpy confusion matrix at each label's size (classes
    absent from both prediction and label left out), and the predicted class maps."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    labels = []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample["image"].shape[-2:] != sample["mask"].shape
            pred = task.infer(sample["image"][None], sample["mask"].shape, tta=tta)[0].argmax(0).numpy()
            target = sample["mask"].numpy()
            keep = target != 255
            np.add.at(confusion, (target[keep], pred[keep]), 1)
            labels.append(pred)
    tp, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    return float(np.mean(tp[union > 0] / union[union > 0])), float(tp.sum() / confusion.sum()), labels


def test_validation_miou_matches_a_computation_at_label_size(run, fitted, monkeypatch):
    tmp, config = fitted
    ckpt = tmp / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    cli = run("validate", config, tmp, monkeypatch, "--ckpt_path", str(ckpt))
    logged = cli.trainer.callback_metrics
    miou, pixel_acc, _ = numpy_miou(cli.model.eval(), cli.datamodule.datasets["val"], tta=False)
    assert float(logged["val/miou"]) == pytest.approx(miou, abs=1e-6)
    assert float(logged["val/pixel_acc"]) == pytest.approx(pixel_acc, abs=1e-6)


def test_test_with_tta_and_predict_write_pngs(run, fitted, monkeypatch):
    tmp, config = fitted
    ckpt = str(tmp / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt")
    tta = ["--model.test_scales", "[0.75, 1.0]", "--model.test_flip", "true", "--model.inference", "slide"]
    tta += ["--model.crop_size", "16", "--model.stride", "12"]
    cli = run("test", config, tmp, monkeypatch, "--ckpt_path", ckpt, *tta)
    task, dataset = cli.model.eval(), cli.datamodule.datasets["val"]
    assert task.hparams.test_flip and task.hparams.inference == "slide"
    miou, pixel_acc, _ = numpy_miou(task, dataset, tta=True)
    assert float(cli.trainer.callback_metrics["test/miou"]) == pytest.approx(miou, abs=1e-6)
    assert float(cli.trainer.callback_metrics["test/pixel_acc"]) == pytest.approx(pixel_acc, abs=1e-6)

    cli = run("predict", config, tmp, monkeypatch, "--ckpt_path", ckpt)
    _, _, expected = numpy_miou(cli.model.eval(), dataset, tta=True)  # predict's views: the config's (one, no flip)
    folder = tmp / "runs" / "predict" / "version_0" / "predictions"
    voc = [128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128]  # PASCAL VOC's colours 1..5
    for stem, labels in zip(("ADE_val_00000001", "ADE_val_00000002"), expected):
        label = Image.open(folder / f"{stem}.png")
        assert label.mode == "P" and label.size == (48, 40) and label.getpalette()[:15] == voc
        np.testing.assert_array_equal(np.asarray(label), labels)
        overlay = Image.open(folder / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (48, 40)


def test_miou_ignores_255_and_matches_a_hand_computation():
    task = tiny_task()
    target = torch.tensor([[[0, 0, 1], [255, 1, 2]]])
    preds = torch.tensor([[[0, 1, 1], [2, 1, 2]]])
    metrics = task.val_metrics(preds, target)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1 (the 2 on the 255 pixel is not an
    # FP) -> 1; classes 3, 4 appear nowhere and are left out of the mean
    assert metrics["val/miou"].item() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["val/pixel_acc"].item() == pytest.approx(4 / 5)


def test_loss_ignores_255_and_is_finite_without_labels():
    task = tiny_task()
    logits = torch.randn(2, NUM_CLASSES, 4, 4)
    target = torch.randint(0, NUM_CLASSES, (2, 4, 4))
    target[0] = 255
    expected = torch.nn.functional.cross_entropy(logits[1:], target[1:])
    torch.testing.assert_close(task.loss(logits, target), expected)
    assert task.loss(logits, torch.full_like(target, 255)).item() == 0.0


def test_class_weights_give_pytorchs_weighted_mean_and_are_checked():
    weights = [0.5, 2.0, 1.0, 0.0, 3.0][:NUM_CLASSES] + [1.0] * max(0, NUM_CLASSES - 5)
    task = tiny_task(class_weights=weights)
    logits = torch.randn(2, NUM_CLASSES, 4, 4)
    target = torch.randint(0, NUM_CLASSES, (2, 4, 4))
    target[0, :2] = 255
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    torch.testing.assert_close(task.loss(logits, target), expected)
    assert task.loss(logits, torch.full_like(target, 255)).item() == 0.0
    with pytest.raises(ValueError, match=f"class_weights needs {NUM_CLASSES} non-negative weights"):
        tiny_task(class_weights=[1.0, 2.0])


def test_backbone_is_shared_with_the_segmentor():
    task = tiny_task(aux_weight=0.0)
    assert task.backbone is task.model.backbone and task.model.aux_head is None
    assert not any(k.startswith("backbone.") for k in task.state_dict())
    with pytest.raises(ValueError, match="class_names"):
        tiny_task(class_names=["a"])
