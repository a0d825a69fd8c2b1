"""Shared optimisation: learning-rate schedule corners, parameter groups, layer decay, lr scaling."""

import math

import pytest
import torch

from swin.models import build_swin
from swin.tasks.base import lr_factor, param_groups, swin_layer_id

SMALL = dict(embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4)


def test_warmup_starts_at_the_start_factor_and_reaches_one():
    assert lr_factor(0, 100, warmup_steps=10, warmup_start=1e-3) == pytest.approx(1e-3)
    assert lr_factor(5, 100, warmup_steps=10, warmup_start=0.0) == pytest.approx(0.5)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)


def test_cosine_ends_at_min_ratio_and_is_half_way_in_the_middle():
    assert lr_factor(100, 100, warmup_steps=10, min_ratio=0.01) == pytest.approx(0.01)
    mid = lr_factor(55, 100, warmup_steps=10, min_ratio=0.0)
    assert mid == pytest.approx(0.5)
    values = [lr_factor(s, 100, warmup_steps=10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_poly_and_step_schedules():
    assert lr_factor(60, 110, warmup_steps=10, schedule="poly", power=1.0) == pytest.approx(0.5)
    assert lr_factor(60, 110, warmup_steps=10, schedule="poly", power=2.0) == pytest.approx(0.25)
    assert lr_factor(110, 110, warmup_steps=10, schedule="poly") == pytest.approx(0.0)
    milestones = [80, 110]
    assert lr_factor(79, 120, schedule="step", milestones=milestones) == 1.0
    assert lr_factor(80, 120, schedule="step", milestones=milestones) == pytest.approx(0.1)
    assert lr_factor(115, 120, schedule="step", milestones=milestones) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(50, 100, schedule="linear")


def test_no_decay_on_norms_biases_and_position_tables():
    model = build_swin("custom", **SMALL, num_classes=3, ape=True, img_size=32)
    groups = param_groups(model, 0.05, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert "absolute_pos_embed" in plain
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in plain
    assert "layers.0.blocks.0.norm1.weight" in plain and "layers.0.blocks.0.attn.qkv.bias" in plain
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    assert "patch_embed.proj.weight" in decayed and "layers.0.downsample.reduction.weight" in decayed


def test_layer_decay_scales_deeper_layers_less():
    model = build_swin("custom", **SMALL, num_classes=3)
    groups = param_groups(model, 0.05, model, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    # depths (1, 2): embedding 0, blocks 1..3, head 4 → scale 0.5 ** (4 - id)
    assert scale[id(model.patch_embed.proj.weight)] == pytest.approx(0.5**4)
    assert scale[id(model.layers[0].blocks[0].attn.qkv.weight)] == pytest.approx(0.5**3)
    assert scale[id(model.layers[0].downsample.reduction.weight)] == pytest.approx(0.5**3)
    assert scale[id(model.layers[1].blocks[1].mlp.fc2.weight)] == pytest.approx(0.5**1)
    assert scale[id(model.head.weight)] == pytest.approx(1.0)
    assert swin_layer_id("norm.weight", (1, 2)) == 4


def test_frozen_parameters_are_not_optimised():
    model = build_swin("custom", **SMALL, num_classes=3, frozen_stages=2)
    ids = {id(p) for g in param_groups(model, 0.05, model) for p in g["params"]}
    assert id(model.patch_embed.proj.weight) not in ids
    assert id(model.layers[0].blocks[0].attn.qkv.weight) not in ids
    assert id(model.layers[1].blocks[0].attn.qkv.weight) in ids


def test_learning_rate_follows_the_global_batch():
    from types import SimpleNamespace

    from swin.tasks.classification import ClassificationTask

    task = ClassificationTask(num_classes=3, backbone="custom", backbone_kwargs=SMALL, lr=1e-3, lr_batch_size=1024)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=128), world_size=8, accumulate_grad_batches=2)
    task.__dict__["_trainer"] = trainer  # what Lightning attaches; only these three fields are read
    assert task.global_batch_size() == 2048
    assert math.isclose(task.scaled_lr(), 2e-3)


def test_optimizer_is_fused_adamw_at_the_scaled_lr_stepped_per_iteration():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision

    from swin.tasks.classification import ClassificationTask

    task = ClassificationTask(
        num_classes=3, backbone="custom", backbone_kwargs=SMALL, lr=1e-3, lr_batch_size=1024, warmup_steps=10
    )
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=256), world_size=2, accumulate_grad_batches=1,
        estimated_stepping_batches=100, max_epochs=None, precision_plugin=Precision(), gradient_clip_val=None,
    )  # fmt: skip
    task.__dict__["_trainer"] = trainer
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert scheduler["interval"] == "step"
    assert all(math.isclose(g["initial_lr"], 5e-4) for g in optimizer.param_groups)  # 1e-3 × 512 / 1024
    for _ in range(10):
        scheduler["scheduler"].step()
    assert all(math.isclose(g["lr"], 5e-4) for g in optimizer.param_groups)  # warm-up done


TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)


@pytest.mark.parametrize("task_name", ["ClassificationTask", "DetectionTask", "SegmentationTask"])
def test_class_names_must_match_the_class_count(task_name):
    import swin.tasks

    task = getattr(swin.tasks, task_name)
    with pytest.raises(ValueError, match="2 names for num_classes=3"):
        task(num_classes=3, class_names=["a", "b"], backbone="custom", backbone_kwargs=TINY)
    assert task(num_classes=2, class_names=["a", "b"], backbone="custom", backbone_kwargs=TINY).hparams.num_classes == 2


def test_gradient_clipping_works_with_the_fused_optimizer_under_bf16():
    """Lightning refuses to clip for optimizers that unscale themselves (the fused AdamW) even under bf16, where no
    grad scaler exists; the task clips there itself, by Lightning's own rule."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    from swin.tasks.classification import ClassificationTask

    task = ClassificationTask(num_classes=3, backbone="custom", backbone_kwargs=SMALL, lr_batch_size=None)
    plugin = MixedPrecision("bf16-mixed", "cpu")
    trainer = SimpleNamespace(
        precision_plugin=plugin, gradient_clip_val=1.0, datamodule=SimpleNamespace(batch_size=2), world_size=1,
        accumulate_grad_batches=1, estimated_stepping_batches=10, max_epochs=None,
    )  # fmt: skip
    task.__dict__["_trainer"] = trainer
    optimizer = task.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
    for p in task.parameters():
        p.grad = torch.full_like(p, 3.0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        plugin.clip_gradients(optimizer, 1.0)  # what Lightning alone would do
    task.configure_gradient_clipping(optimizer, 1.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-3)
    task.configure_gradient_clipping(optimizer, 0.5, "value")
    assert max(p.grad.abs().max() for p in task.parameters()) <= 0.5
