"""Checkpoints written before the tasks kept their network in ``self.model`` (commit eaf9d1d: ``backbone.*``,
``detector.*``) still resume (``--ckpt_path``) and load into ``load_pretrained``. The fixtures were made by
``tests/fixtures/legacy/make_legacy.py`` at that commit."""

from pathlib import Path

import pytest
import torch
import yaml

from swin.data import shapes
from swin.models import build_swin, load_pretrained

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
BACKBONE = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, drop_path_rate=0.0)
TASKS = {
    "classification": (
        {"class_path": "swin.tasks.classification.ClassificationTask", "init_args": {
            "backbone": "custom", "backbone_kwargs": {**BACKBONE, "depths": [1, 1], "num_heads": [1, 1]},
            "ema_decay": 0.9, "lr_batch_size": None, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}},
        {"class_path": "swin.data.imagenet.ImageNetDataModule", "init_args": {
            "image_size": 32, "batch_size": 4, "num_workers": 0, "randaugment": False}},
        lambda root: shapes.write_imagefolder(root, num_train=2, num_val=1, image_size=32),
        {"backbone.": "model."},
    ),
    "detection": (
        {"class_path": "swin.tasks.detection.DetectionTask", "init_args": {
            "backbone": "custom", "backbone_kwargs": BACKBONE, "fpn_channels": 8, "representation_size": 16,
            "mask_channels": 8, "anchor_sizes": [8, 16, 32, 64, 128], "min_size": 64, "max_size": 64,
            "lr_batch_size": None, "milestones": []}},
        {"class_path": "swin.data.coco.COCODataModule", "init_args": {
            "batch_size": 2, "num_workers": 0, "train_sizes": [64], "max_size": 64}},
        lambda root: shapes.write_coco(root, num_train=4, num_val=2, image_size=64),
        {"detector.": "model."},
    ),
    "segmentation": (
        {"class_path": "swin.tasks.segmentation.SegmentationTask", "init_args": {
            "backbone": "custom", "backbone_kwargs": BACKBONE, "channels": 8, "aux_channels": 8,
            "lr_batch_size": None}},
        {"class_path": "swin.data.ade20k.ADE20KDataModule", "init_args": {
            "synthetic": True, "batch_size": 2, "num_workers": 0, "crop_size": 32, "base_size": [32, 32]}},
        lambda root: shapes.write_ade20k(root, num_train=4, num_val=2, image_size=32),
        {},
    ),
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(TASKS))
def test_old_checkpoint_resumes_validates_and_loads_its_backbone(task, tmp_path, run, monkeypatch):
    model, data, write, renamed = TASKS[task]
    write(tmp_path / "data")
    data = {**data, "init_args": {**data["init_args"], "root": str(tmp_path / "data")}}
    trainer = {"accelerator": "cpu", "max_epochs": 2, "limit_train_batches": 1, "limit_val_batches": 1,
               "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"seed_everything": 1, "trainer": trainer, "model": model, "data": data}))
    ckpt = LEGACY / f"{task}.ckpt"
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    old_state = old["state_dict"]

    cli = run("validate", config, tmp_path, monkeypatch, "--ckpt_path", str(ckpt))
    state = cli.model.state_dict()
    assert set(state) == {_rename(k, renamed) for k in old_state}
    for key, value in old_state.items():
        torch.testing.assert_close(state[_rename(key, renamed)], value, rtol=0, atol=0, msg=key)

    cli = run("fit", config, tmp_path, monkeypatch, "--ckpt_path", str(ckpt))
    # the optimizer and the schedule carry on from the checkpoint's step count (how many batches Lightning
    # replays in the restarted epoch differs between its releases, so only the continuity is asserted)
    steps = cli.trainer.global_step
    assert steps > old["global_step"] and cli.trainer.current_epoch == 2
    adam_steps = {int(s["step"]) for s in cli.trainer.optimizers[0].state.values()}
    assert adam_steps == {steps}, (adam_steps, steps)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == steps

    kwargs = {"num_classes": 5} if task == "classification" else {"num_classes": None, "out_indices": (0, 1, 2, 3)}
    backbone_kwargs = model["init_args"]["backbone_kwargs"]
    load_pretrained(build_swin("custom", **backbone_kwargs, **kwargs), ckpt, strict=True)


def _rename(key: str, renamed: dict[str, str]) -> str:
    for old, new in renamed.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key
