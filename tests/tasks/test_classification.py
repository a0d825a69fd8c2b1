"""Classification through ``cli.py``: fit, validate, test and predict on a tiny ImageFolder tree; the config round
trip; mixup / cutmix targets; the EMA."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from swin.cli import main
from swin.data import shapes
from swin.data.imagenet import ImageNetDataModule
from swin.models import build_swin
from swin.models.weights import load_pretrained
from swin.tasks.classification import ClassificationTask

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = len(shapes.SHAPE_CLASSES)
BACKBONE = dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, drop_path_rate=0.0)


def write_config(tmp: Path, root: Path, **model_args) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "swin.writers.ClassificationCSVWriter"}]},
        "model": {
            "class_path": "swin.tasks.classification.ClassificationTask",
            "init_args": {"backbone": "custom", "backbone_kwargs": BACKBONE, "lr": 1e-3, "lr_batch_size": 8,
                          "warmup_epochs": 1, **model_args},
        },
        "data": {
            "class_path": "swin.data.imagenet.ImageNetDataModule",
            "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0,
                          "predict_root": str(root / "val"), "randaugment": False},
        },
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(run, tmp_path_factory):
    """Two epochs on 5 classes × 4 images with the EMA on."""
    tmp = tmp_path_factory.mktemp("cls")
    root = tmp / "shapes"
    shapes.write_imagefolder(root, num_train=4, num_val=2, image_size=32)
    config = write_config(tmp, root, ema_decay=0.5)
    with pytest.MonkeyPatch.context() as mp:
        run("fit", config, tmp, mp)
    return tmp, config


def test_fit_logs_metrics_keeps_best_and_last_and_saves_its_config(fitted):
    tmp, _ = fitted
    run_dir = tmp / "runs" / "fit" / "version_0"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val = [r for r in rows if r.get("val/acc1")]
    assert [int(r["epoch"]) for r in val] == [0, 1]
    assert all(0 <= float(r["val/acc1"]) <= float(r["val/acc5"]) <= 1 and float(r["val/loss"]) > 0 for r in val)
    assert sum(1 for r in rows if r.get("train/loss")) == 10  # 20 images / batch 4, two epochs, logged every step
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard in the same folder
    names = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    best = [n for n in names if n.startswith("best-epoch")]
    assert "last.ckpt" in names and len(best) == 1
    # the best checkpoint is the epoch of the highest val/acc1 (the first of equals: a later one must be better)
    acc = [float(r["val/acc1"]) for r in val]
    best_epoch = acc.index(max(acc))
    saved_best = torch.load(run_dir / "checkpoints" / best[0], map_location="cpu", weights_only=True)
    assert saved_best["epoch"] == best_epoch and best[0].startswith(f"best-epoch{best_epoch:03d}-"), (best, acc)
    callback = next(v for k, v in saved_best["callbacks"].items() if "val/acc1" in k)
    assert float(callback["best_model_score"]) == pytest.approx(max(acc))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["init_args"]["root"].endswith("shapes") and saved["seed_everything"] == 3
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == NUM_CLASSES  # linked from the datamodule
    assert hparams["class_names"] == sorted(shapes.SHAPE_CLASSES)
    model = build_swin("custom", **BACKBONE, num_classes=NUM_CLASSES)
    load_pretrained(model, run_dir / "checkpoints" / "last.ckpt", strict=True)


def test_validate_evaluates_the_ema_weights(run, fitted, monkeypatch):
    tmp, config = fitted
    ckpt = tmp / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    task = ClassificationTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    trained, averaged = task.model.head.weight, task.ema.module.head.weight
    assert not torch.equal(trained, averaged)  # decay 0.5 over 10 steps: the average lags the weights
    cli = run("validate", config, tmp, monkeypatch, "--ckpt_path", str(ckpt))
    logged = float(cli.trainer.callback_metrics["val/loss"])
    fit_rows = list(csv.DictReader(open(tmp / "runs" / "fit" / "version_0" / "metrics.csv")))
    assert logged == pytest.approx(float([r for r in fit_rows if r.get("val/acc1")][-1]["val/loss"]), rel=1e-4)

    data = ImageNetDataModule(root=str(tmp / "shapes"), image_size=32, batch_size=4, num_workers=0)
    data.setup("validate")

    def val_loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            losses = [F.cross_entropy(model.eval()(b["image"]), b["label"], reduction="sum") for b in data.val_dataloader()]
        return float(sum(losses)) / len(data.datasets["val"])

    ema_loss, raw_loss = val_loss(task.ema.module), val_loss(task.model)
    assert logged == pytest.approx(ema_loss, rel=1e-4)
    # the EMA weights were evaluated, not the trained ones (whose loss may be close: compare the distances)
    assert abs(logged - ema_loss) < abs(logged - raw_loss) / 10, (logged, ema_loss, raw_loss)


def test_test_and_predict_write_metrics_and_top5_csv(run, fitted, monkeypatch):
    tmp, config = fitted
    ckpt = str(tmp / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt")
    cli = run("test", config, tmp, monkeypatch, "--ckpt_path", ckpt)
    metrics = cli.trainer.callback_metrics
    run("predict", config, tmp, monkeypatch, "--ckpt_path", ckpt)
    rows = list(csv.DictReader(open(tmp / "runs" / "predict" / "version_0" / "predictions" / "predictions.csv")))
    assert len(rows) == NUM_CLASSES * 2 and all(Path(r["path"]).is_file() for r in rows)
    # the test accuracies are those of the predictions (same weights, same images): the label is the image's folder
    hits = [[r[f"class{i}"] for i in range(1, 6)].index(Path(r["path"]).parent.name) for r in rows]
    assert float(metrics["test/acc1"]) == pytest.approx(sum(h == 0 for h in hits) / len(rows), abs=1e-6)
    assert float(metrics["test/acc5"]) == pytest.approx(1.0)  # 5 classes: the top 5 hold every label
    for row in rows:
        probs = [float(row[f"prob{i}"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0.99 < sum(probs) <= 1.0 + 1e-5  # all 5 classes
        assert {row[f"class{i}"] for i in range(1, 6)} == set(shapes.SHAPE_CLASSES)


def test_fast_dev_run_and_a_later_config_wins(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    shapes.write_imagefolder(root, num_train=2, num_val=1, image_size=32)
    config = write_config(tmp_path, root)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"model": {"init_args": {"label_smoothing": 0.3}}, "trainer": {"max_epochs": 5}}))
    cli = main(
        ["fit", "--config", str(config), "--config", str(override), "--trainer.fast_dev_run", "true",
         "--trainer.default_root_dir", str(tmp_path / "runs")]
    )  # fmt: skip
    assert cli.model.hparams.label_smoothing == 0.3 and cli.config.fit.trainer.max_epochs == 5
    assert cli.trainer.global_step == 1  # fast_dev_run: one batch


def test_print_config_round_trips(tmp_path, capsys):
    root = tmp_path / "shapes"
    shapes.write_imagefolder(root, num_train=1, num_val=1, image_size=32)
    config = write_config(tmp_path, root, mixup_alpha=0.2)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr().out
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(again), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)
    assert yaml.safe_load(printed)["model"]["init_args"]["mixup_alpha"] == 0.2


def test_python_dash_m_swin_is_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "swin", "fit", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--model" in result.stdout and "--data" in result.stdout


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_soft_smoothed_and_sum_to_one(mixup, cutmix):
    task = ClassificationTask(
        num_classes=4, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, backbone="custom",
        backbone_kwargs=BACKBONE,
    )  # fmt: skip
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, targets = task.mix(images, labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(1), torch.ones(6))
    assert (targets >= 0.1 / 4 - 1e-6).all()  # smoothing floor
    # each row mixes its own label with the label of the image it was blended with (the batch rolled by one)
    partner = labels.roll(1)
    for row, a, b in zip(targets, labels, partner):
        assert set(row.topk(2 if a != b else 1).indices.tolist()) == {int(a), int(b)}


def test_without_mixing_targets_are_smoothed_one_hot():
    task = ClassificationTask(num_classes=4, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.2,
                              backbone="custom", backbone_kwargs=BACKBONE)  # fmt: skip
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([3, 1])
    mixed, targets = task.mix(images, labels)
    assert torch.equal(mixed, images)
    assert torch.allclose(targets, torch.tensor([[0.05, 0.05, 0.05, 0.85], [0.05, 0.85, 0.05, 0.05]]))
