"""configs/*/finetune_*.yaml: each starts from a published checkpoint (written here in the official layout, random
weights), takes its class count from the data, and trains."""

from pathlib import Path

import pytest
import torch

from swin.data import shapes
from swin.models import build_swin

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CASES = {
    "classification": (
        "classification/finetune_swin_t.yaml",
        lambda root: shapes.write_imagefolder(root, num_train=4, num_val=1, image_size=64),
        ["--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0"],
        5,
    ),
    "detection": (
        "detection/finetune_mask_rcnn_swin_t.yaml",
        lambda root: shapes.write_coco(root, num_train=4, num_val=1, image_size=96),
        ["--data.train_sizes", "[96]", "--data.max_size", "128", "--model.min_size", "96", "--model.max_size", "128",
         "--data.num_workers", "0"],
        5,
    ),
    "segmentation": (
        "segmentation/finetune_upernet_swin_t.yaml",
        lambda root: shapes.write_ade20k(root, num_train=4, num_val=1, image_size=64),
        ["--data.num_classes", "5", "--data.crop_size", "64", "--data.base_size", "[128, 64]", "--data.batch_size", "2",
         "--data.num_workers", "0", "--model.channels", "32", "--model.aux_channels", "16"],
        5,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def official_swin_t(tmp_path_factory) -> tuple[Path, dict]:
    """An ImageNet-1K Swin-T checkpoint in the official release's layout ({"model": ...}, 1000-class head)."""
    torch.manual_seed(0)
    state = build_swin("swin_t", num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("official") / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state, "epoch": 299}, path)
    return path, state


@pytest.mark.parametrize("task", sorted(CASES))
def test_finetune_config_starts_from_the_checkpoint_with_the_datas_classes(task, official_swin_t, tmp_path, run,
                                                                           monkeypatch):  # fmt: skip
    config, write, overrides, num_classes = CASES[task]
    write(tmp_path / "data")
    checkpoint, official = official_swin_t
    cli = run("fit", CONFIGS / config, tmp_path, monkeypatch, "--model.pretrained", str(checkpoint),
              "--data.root", str(tmp_path / "data"), "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
              "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "null",
              "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false", *overrides)  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.model.hparams.num_classes == num_classes
    backbone = cli.model.backbone.state_dict()
    moved = 0.0
    for name, value in official.items():
        if name in backbone and not name.startswith("head."):  # the backbone starts from the checkpoint: two warm-up steps move it very little
            moved = max(moved, (backbone[name].float() - value).abs().max().item())
    assert 0 < moved < 1e-3, moved
    fresh = build_swin("swin_t", num_classes=None).state_dict()  # a random start would be far away
    assert (backbone["layers.0.blocks.0.attn.qkv.weight"] - fresh["layers.0.blocks.0.attn.qkv.weight"]).abs().max() > 1e-2
    if task == "classification":  # the 1000-class head is dropped for one with the data's classes
        assert cli.model.model.head.weight.shape == (num_classes, 768)
