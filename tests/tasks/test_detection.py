"""Detection through the CLI on a tiny COCO tree, and COCO mAP cross-checked against pycocotools' COCOeval."""

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from swin.data import shapes
from swin.data.coco import CocoInstances, read_coco
from swin.models import CascadeRCNN, build_swin
from swin.models.weights import load_pretrained
from swin.tasks.detection import DetectionTask, coco_results

BACKBONE = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4, drop_path_rate=0.0)
HEADS = dict(fpn_channels=32, representation_size=64, mask_channels=16, anchor_sizes=[8, 16, 32, 64, 128],
             min_size=64, max_size=96)  # fmt: skip
NUM_VAL = 4


def write_config(tmp, root, **model_args):
    config = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "swin.writers.DetectionWriter", "init_args": {"score_threshold": 0.0}}]},
        "model": {
            "class_path": "swin.tasks.detection.DetectionTask",
            "init_args": {"backbone": "custom", "backbone_kwargs": BACKBONE, **HEADS, "lr": 1e-3,
                          "lr_batch_size": None, "warmup_steps": 1, "milestones": [],
                          "detector_kwargs": {"box_score_thresh": 0.0, "box_detections_per_img": 20}, **model_args},
        },
        "data": {
            "class_path": "swin.data.coco.COCODataModule",
            "init_args": {"root": str(root), "batch_size": 2, "num_workers": 0, "train_sizes": [48, 64],
                          "max_size": 96},
        },
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tiny COCO tree: polygons, compressed and uncompressed RLE, crowds, an empty image, category ids with gaps."""
    root = tmp_path_factory.mktemp("det") / "coco"
    shapes.write_coco(root, num_train=8, num_val=NUM_VAL, image_size=64)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs)  # polygons
    assert {type(s["counts"]) for s in segs if isinstance(s, dict)} == {str, list}  # compressed and raw RLE
    assert any(a["iscrowd"] for a in data["annotations"])
    assert {img["id"] for img in data["images"]} - {a["image_id"] for a in data["annotations"]}  # an empty image
    assert sorted(c["id"] for c in data["categories"]) != list(range(1, len(data["categories"]) + 1))  # gaps
    return root


@pytest.fixture(scope="module")
def fitted(run, tree, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det_run")
    config = write_config(tmp, tree)
    with pytest.MonkeyPatch.context() as mp:
        cli = run("fit", config, tmp, mp)
    return tmp, config, cli.trainer.checkpoint_callback.best_model_path


def test_fit_logs_box_and_mask_map_and_checkpoints_the_category_map(fitted):
    tmp, _, best = fitted
    run_dir = tmp / "runs" / "fit" / "version_0"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val = [r for r in rows if r.get("val/bbox_map")]
    assert len(val) == 1
    train = [r for r in rows if r.get("train/loss")]
    assert train and all(r.get("train/loss_mask") and r.get("train/loss_objectness") for r in train)
    assert best and "best" in best and (run_dir / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert state["category_ids"].tolist() == shapes.COCO_CATEGORY_IDS
    task = DetectionTask.load_from_checkpoint(best, map_location="cpu", weights_only=True)  # the whole detector
    assert task.category_ids.tolist() == shapes.COCO_CATEGORY_IDS and task.hparams.class_names == shapes.SHAPE_CLASSES
    backbone = build_swin("custom", **BACKBONE, num_classes=None, out_indices=(0, 1, 2, 3))
    load_pretrained(backbone, best, strict=True)  # the backbone alone, from this project's detector checkpoint
    key = "model.backbone.body.patch_embed.proj.weight"
    torch.testing.assert_close(backbone.patch_embed.proj.weight, state[key])


def test_test_and_predict_from_the_checkpoint_write_coco_results_and_overlays(run, fitted, tree, monkeypatch):
    tmp, config, best = fitted
    cli = run("test", config, tmp, monkeypatch, "--ckpt_path", best)
    metrics = cli.trainer.callback_metrics

    cli = run("predict", config, tmp, monkeypatch, "--ckpt_path", best)
    out = tmp / "runs" / "predict" / "version_0" / "predictions"
    results = json.loads((out / "coco_results.json").read_text())
    assert len(list(out.glob("*.png"))) == NUM_VAL
    assert results and {r["category_id"] for r in results} <= set(shapes.COCO_CATEGORY_IDS)
    assert all(isinstance(r["segmentation"]["counts"], str) and r["image_id"] is not None for r in results)
    # the file is valid COCO results, and COCOeval on it gives the test's figures (predict and test ran the same
    # detector on the same images; the file rounds boxes to 0.01 px and scores to 1e-5)
    names = [f"{a}_{s}" for a, sizes in (("map", ("", "50", "75")), ("mar", ("1", "10", "100"))) for s in sizes]
    names = [n.rstrip("_") for n in names]  # COCOeval's stats 0-2 and 6-8, as torchmetrics names them
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tree / "annotations" / "instances_val2017.json"))
        for iou_type in ("bbox", "segm"):
            evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            for name, stat in zip(names, [*evaluator.stats[:3], *evaluator.stats[6:9]]):
                assert float(metrics[f"test/{iou_type}_{name}"]) == pytest.approx(stat, abs=1e-3), (iou_type, name)
    # the two-step detector finds nothing here (all zero); non-zero figures are compared in
    # test_map_of_perfect_and_shifted_predictions_matches_cocoeval and test_ddp_eval.py


def test_predict_on_a_folder_names_results_by_file(run, fitted, monkeypatch):
    tmp, config, best = fitted
    folder = tmp / "new_images"
    folder.mkdir()
    for name, size in (("street.jpg", (50, 40)), ("field.png", (64, 64))):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    run("predict", config, tmp, monkeypatch, "--ckpt_path", best, "--data.predict_root", str(folder), name="folder")
    out = tmp / "runs" / "folder" / "version_0" / "predictions"
    results = json.loads((out / "coco_results.json").read_text())
    assert {r["file_name"] for r in results} == {"street.jpg", "field.png"}
    assert all(r["image_id"] is None for r in results)
    assert {p.name for p in out.glob("*.png")} == {"street.png", "field.png"}
    assert Image.open(out / "street.png").size == (40, 50)


def test_cascade_fits_tests_and_predicts_through_the_cli(run, tree, tmp_path, monkeypatch):
    config = write_config(tmp_path, tree, framework="cascade_mask_rcnn")
    cli = run("fit", config, tmp_path, monkeypatch)
    assert isinstance(cli.model.model, CascadeRCNN) and cli.model.hparams.framework == "cascade_mask_rcnn"
    rows = list(csv.DictReader(open(tmp_path / "runs" / "fit" / "version_0" / "metrics.csv")))
    train = [r for r in rows if r.get("train/loss")]
    assert train and all(r.get(f"train/loss_{k}_s{i}") for r in train for k in ("cls", "box", "mask") for i in range(3))
    assert all(0.0 <= float(r["val/segm_map"]) <= 1.0 for r in rows if r.get("val/bbox_map"))
    best = cli.trainer.checkpoint_callback.best_model_path
    task = DetectionTask.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    assert isinstance(task.model, CascadeRCNN) and task.category_ids.tolist() == shapes.COCO_CATEGORY_IDS

    cli = run("test", config, tmp_path, monkeypatch, "--ckpt_path", best)
    assert {"test/bbox_map", "test/bbox_map_50", "test/segm_map"} <= set(cli.trainer.callback_metrics)
    run("predict", config, tmp_path, monkeypatch, "--ckpt_path", best)
    out = tmp_path / "runs" / "predict" / "version_0" / "predictions"
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(shapes.COCO_CATEGORY_IDS)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert len(list(out.glob("*.png"))) == NUM_VAL


@pytest.mark.parametrize("framework", ["retinanet", "fcos"])
def test_single_stage_frameworks_fit_and_evaluate_through_the_cli(run, tree, tmp_path, monkeypatch, framework):
    detector_kwargs = {"score_thresh": 0.0, "detections_per_img": 20}
    config = write_config(tmp_path, tree, framework=framework, masks=False, detector_kwargs=detector_kwargs)
    cli = run("fit", config, tmp_path, monkeypatch)
    assert type(cli.model.model).__name__ == {"retinanet": "SwinRetinaNet", "fcos": "SwinFCOS"}[framework]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "fit" / "version_0" / "metrics.csv")))
    assert any(r.get("train/loss") and r.get("train/classification") for r in rows)
    val = [r for r in rows if r.get("val/bbox_map")]
    assert len(val) == 1 and 0.0 <= float(val[0]["val/bbox_map_50"]) <= 1.0 and "val/segm_map" not in val[0]


def test_unknown_framework_is_refused():
    with pytest.raises(ValueError, match="framework must be one of mask_rcnn, cascade_mask_rcnn, retinanet, fcos"):
        DetectionTask(3, framework="detr", backbone="custom", backbone_kwargs=BACKBONE, **HEADS)
    with pytest.raises(ValueError, match="'retinanet' has no mask branch"):
        DetectionTask(3, framework="retinanet", backbone="custom", backbone_kwargs=BACKBONE, **HEADS)
    with pytest.raises(ValueError, match="model.class_weights weights a softmax classifier"):
        DetectionTask(3, framework="fcos", masks=False, class_weights=[1, 2, 3], backbone="custom",
                      backbone_kwargs=BACKBONE, **HEADS)  # fmt: skip


@pytest.mark.parametrize("framework", ["mask_rcnn", "cascade_mask_rcnn"])
def test_class_weights_reach_the_heads_of_both_rcnn_frameworks(framework):
    task = DetectionTask(3, framework=framework, class_weights=[1, 2, 3], backbone="custom", backbone_kwargs=BACKBONE,
                         **HEADS)  # fmt: skip
    torch.testing.assert_close(task.model.roi_heads.class_weight, torch.tensor([1.0, 1.0, 2.0, 3.0]))
    assert "class_weight" not in "".join(task.state_dict())
    with pytest.raises(ValueError, match="class_weights needs 3 non-negative weights"):
        DetectionTask(3, framework=framework, class_weights=[1, 2], backbone="custom", backbone_kwargs=BACKBONE, **HEADS)


def test_checkpoint_of_other_category_ids_is_refused(run, fitted, tree, monkeypatch):
    tmp, config, best = fitted
    other = tmp / "other_ids"
    shutil.copytree(tree, other)
    for split in ("train", "val"):
        path = other / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        for item in data["categories"] + data["annotations"]:
            key = "id" if "name" in item else "category_id"
            item[key] += 100
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="trained on category ids"):
        run("validate", config, tmp, monkeypatch, "--ckpt_path", best, "--data.root", str(other))


def test_backbone_loads_from_a_classification_checkpoint(tmp_path):
    classifier = build_swin("custom", **BACKBONE, num_classes=7)
    torch.save({"model": classifier.state_dict()}, tmp_path / "classifier.pth")
    task = DetectionTask(3, backbone="custom", backbone_kwargs=BACKBONE, pretrained=str(tmp_path / "classifier.pth"),
                         **HEADS)  # fmt: skip
    for name, value in classifier.state_dict().items():
        if not name.startswith(("head.", "norm.")):
            torch.testing.assert_close(task.backbone.state_dict()[name], value, msg=name)
    assert task.backbone is task.model.backbone.body


# -- COCO mAP, cross-checked against pycocotools ------------------------------------------------------------------


def perfect_predictions(dataset):
    """Every non-crowd object found, with masks as torchvision gives them (N, 1, H, W probabilities)."""
    preds = []
    for sample in dataset:
        target = sample["target"]
        keep = target["iscrowd"] == 0
        n = int(keep.sum())
        scores = torch.linspace(0.9, 0.5, n) if n else torch.zeros(0)
        preds.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep], "scores": scores,
                      "masks": target["masks"][keep][:, None].float()})  # fmt: skip
    return preds


def shifted(preds, pixels):
    """Boxes and masks moved right by ``pixels`` (every other object, so that recall and precision drop unevenly)."""
    out = []
    for p in preds:
        p = {k: v.clone() for k, v in p.items()}
        p["boxes"][::2, [0, 2]] += pixels
        p["masks"][::2] = torch.roll(p["masks"][::2], pixels, dims=-1)
        out.append(p)
    return out


def cocoeval_stats(coco, dataset, preds, category_ids, iou_type):
    """COCOeval's stats of the predictions, in COCO results format as the prediction writer writes them."""
    results = []
    for sample, p in zip(dataset, preds):
        prediction = {"path": sample["path"], "image_id": sample["image_id"], "boxes": p["boxes"], "scores": p["scores"],
                      "category_id": torch.tensor(category_ids)[p["labels"] - 1], "masks": p["masks"][:, 0] > 0.5}  # fmt: skip
        results += coco_results(prediction)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("pixels", [0, 4, 9])
def test_map_of_perfect_and_shifted_predictions_matches_cocoeval(tree, pixels):
    coco = read_coco(tree / "annotations" / "instances_val2017.json")
    dataset = CocoInstances(coco, tree / "val2017", train=False)
    task = DetectionTask(len(shapes.SHAPE_CLASSES), backbone="custom", backbone_kwargs=BACKBONE, **HEADS)
    task.category_ids.copy_(torch.tensor(shapes.COCO_CATEGORY_IDS))
    preds = shifted(perfect_predictions(dataset), pixels)
    targets = [sample["target"] for sample in dataset]
    task.val_map.update(*task._metric_inputs(preds, targets))
    result = task.val_map.compute()
    for iou_type in ("bbox", "segm"):
        stats = cocoeval_stats(coco, dataset, preds, shapes.COCO_CATEGORY_IDS, iou_type)
        assert float(result[f"{iou_type}_map"]) == pytest.approx(stats[0], abs=1e-6)
        assert float(result[f"{iou_type}_map_50"]) == pytest.approx(stats[1], abs=1e-6)
        if pixels == 0:
            assert float(result[f"{iou_type}_map"]) == pytest.approx(1.0)
        else:
            assert float(result[f"{iou_type}_map"]) < 0.95
