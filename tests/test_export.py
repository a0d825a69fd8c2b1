"""swin.export: ONNX (onnxruntime, CPU) and torch.export programs against the eager fp32 model; bad input."""

import json

import numpy as np
import pytest
import torch
import yaml

from swin.export import build_task, export_module, export_onnx, export_pt2, load_task, main
from swin.models import CheckpointError, SwinTransformer
from swin.models.swin import SwinBlock, WindowAttention, relative_position_index, shift_mask, window_index

ort = pytest.importorskip("onnxruntime")

TINY = {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.0}
TASKS = {
    "classification": {
        "class_path": "swin.tasks.classification.ClassificationTask",
        "init_args": {"backbone": "custom", "backbone_kwargs": TINY, "num_classes": 3, "mixup_alpha": 0.0,
                      "cutmix_alpha": 0.0},
    },
    "segmentation": {
        "class_path": "swin.tasks.segmentation.SegmentationTask",
        "init_args": {"backbone": "custom", "backbone_kwargs": {**TINY, "depths": [1, 2, 1, 2],
                      "num_heads": [1, 1, 2, 2], "window_size": 7}, "num_classes": 4, "channels": 8,
                      "pool_scales": [1, 2, 3, 6], "aux_weight": 0.0},
    },
    "detection": {
        "class_path": "swin.tasks.detection.DetectionTask",
        "init_args": {"backbone": "custom", "backbone_kwargs": {**TINY, "depths": [1, 1, 1, 1],
                      "num_heads": [1, 1, 2, 2], "window_size": 7}, "num_classes": 3, "fpn_channels": 16,
                      "representation_size": 32, "mask_channels": 8, "min_size": 96, "max_size": 128,
                      "detector_kwargs": {"box_score_thresh": 0.0}},
    },
}  # fmt: skip


def _checkpoint(tmp_path, name: str, class_names=None):
    """A config and a checkpoint (state_dict + hyper_parameters, as Lightning writes them) of a tiny task."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": TASKS[name], "data": {"init_args": {"image_size": 40}}}))
    task = build_task(TASKS[name], **({"class_names": class_names} if class_names else {}))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in task.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        if name == "segmentation":  # logits of order 1 rather than 0.01, so that 1e-4 means something
            task.model.decode_head.classifier[1].weight.normal_()
    ckpt = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    return config, ckpt, task.eval()


def _ort(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("size", [(9, 22), (16, 16), (5, 5), (13, 3)])
@pytest.mark.parametrize("shifted", [False, True])
def test_export_path_of_a_block_matches_eager(size, shifted, monkeypatch):
    """A block on its export path (window_tensors: no padded copy, no crop, at least two windows a side, shift and
    mask as tensors), run eagerly, gives the eager path's numbers, with and without padding, shift or one window."""
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window_size=4, shifted=shifted).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # a bias that matters
        x = torch.randn(2, *size, 8)
        expected = block(x)
        monkeypatch.setattr("swin.models.swin.exporting", lambda: True)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_classifier_onnx_and_pt2_match_eager(tmp_path):
    config, ckpt, task = _checkpoint(tmp_path, "classification", ["a", "b", "c"])
    out = tmp_path / "out"
    main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out)])
    program = torch.export.load(out / "model.pt2").module()
    for batch in (1, 3):  # the export ran at batch 2
        x = torch.randn(batch, 3, 40, 40)
        with torch.no_grad():
            expected = task(x)
            assert (program(x) - expected).abs().max() <= 1e-4
        assert np.abs(_ort(out / "model.onnx", x)[0] - expected.numpy()).max() <= 1e-4
    info = json.loads((out / "contract.json").read_text())
    assert info["class_names"] == ["a", "b", "c"] and info["input"]["size"] == [40, 40]
    assert info["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_onnx_graph_without_padding_mask_or_bias_copied_per_image(tmp_path):
    """At 32² (no padding in any block) the export drops the all-True padding mask (``Where``) and the shifted
    block's attention bias broadcasts over the images instead of being copied per image (``Expand``); the model's
    attention is fused again afterwards; the eager numbers."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = SwinTransformer(**{**TINY, "depths": [2, 2]}, num_classes=3).eval()
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "Where" not in ops and "Expand" not in ops and "MatMul" in ops
    assert all(m.fused for m in model.modules() if isinstance(m, WindowAttention))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert np.abs(_ort(path, x)[0] - model(x).numpy()).max() <= 1e-4


def test_dense_backbone_onnx_takes_any_size_in_one_graph(tmp_path):
    """Exported at 40×36 with a dynamic height and width: the same graph at the export's size, at an odd size and at
    one that fits a single window in the last stage (no shift there), none of them window multiples."""
    torch.manual_seed(0)
    model = SwinTransformer(**{**TINY, "window_size": 7}, num_classes=None, out_indices=(0, 1)).eval()
    path = export_onnx(model, torch.randn(2, 3, 40, 36), tmp_path / "backbone.onnx", dynamic_hw=True)
    for size in [(40, 36), (231, 197), (30, 45)]:
        x = torch.randn(1 if size[0] > 100 else 3, 3, *size)
        with torch.no_grad():
            expected = model(x)
        got = _ort(path, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape) and np.abs(g - e.numpy()).max() <= 1e-4, size


SEGMENTOR_SIZES = [(2, (64, 80)), (1, (45, 38)), (3, (97, 250))]  # batch, size: the export's, odd, larger


def test_segmentor_onnx_takes_any_size_in_one_graph(tmp_path):
    """The CLI exports the UperNet segmentor (four stages, window 7) at 64×80 with a dynamic height and width: one
    ONNX graph under onnxruntime gives the eager logits at the export's size, at an odd size whose last two stages
    fit one window (45×38) and at one with shifted windows in every shifted block (97×250)."""
    config, ckpt, task = _checkpoint(tmp_path, "segmentation")
    out = tmp_path / "out"
    main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out), "--format", "onnx", "--size", "64", "80"])
    info = json.loads((out / "contract.json").read_text())
    assert info["input"]["dynamic"] == ["batch", "height", "width"] and info["input"]["min_size"] == 33
    for batch, size in SEGMENTOR_SIZES:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = task.model(x).numpy()
        got = _ort(out / "model.onnx", x)[0]
        assert got.shape == (batch, 4, *size) and np.abs(got - expected).max() <= 1e-4, size


def test_segmentor_pt2_takes_any_size_in_one_program(tmp_path):
    """The same segmentor as one torch.export program with a dynamic height and width; an example below the
    smallest size (every stage's map at least 2 a side) is refused."""
    _, _, task = _checkpoint(tmp_path, "segmentation")
    export_pt2(task.model, torch.randn(2, 3, 64, 80), tmp_path / "model.pt2", dynamic_hw=True)
    program = torch.export.load(tmp_path / "model.pt2").module()
    for batch, size in SEGMENTOR_SIZES:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            assert (program(x) - task.model(x)).abs().max() <= 1e-4, size
    with pytest.raises(ValueError, match="sizes from 33"):
        export_pt2(task.model, torch.randn(1, 3, 32, 80), tmp_path / "small.pt2", dynamic_hw=True)


def test_upernet_head_exports_with_dynamic_sizes():
    """The decode head's resizes keep symbolic sizes (no int(), no guard): one torch.export program with a dynamic
    height and width per level gives the eager logits at the export's sizes and at odd ones."""
    from swin.models.upernet import UperNetHead

    torch.manual_seed(0)
    widths = [8, 16, 32, 64]
    head = UperNetHead(widths, 4, channels=8, pool_scales=[1, 2]).eval()

    def features(h: int, w: int, batch: int) -> list[torch.Tensor]:
        return [torch.randn(batch, c, (h - 1) // 2**i + 1, (w - 1) // 2**i + 1) for i, c in enumerate(widths)]

    dim = torch.export.Dim
    levels = [{0: dim("b"), 2: dim(f"h{i}", min=2, max=1024), 3: dim(f"w{i}", min=2, max=1024)} for i in range(4)]
    with torch.no_grad():
        program = torch.export.export(head, (features(12, 10, 2),), dynamic_shapes=(levels,)).module()
        for h, w in [(12, 10), (17, 23), (25, 14)]:
            x = features(h, w, 1)
            assert (program(x) - head(x)).abs().max() <= 1e-5, (h, w)


def test_bad_input_names_the_file(tmp_path, capsys):
    config, ckpt, _ = _checkpoint(tmp_path, "classification")
    seg_config, seg_ckpt, _ = _checkpoint(tmp_path, "segmentation")
    with pytest.raises(CheckpointError, match=rf"{seg_ckpt.name} is not a ClassificationTask checkpoint.*missing"):
        load_task(config, seg_ckpt)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{junk.name} is not a checkpoint"):
        load_task(config, junk)
    bare = tmp_path / "bare.pt"
    torch.save({"weights": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match=rf"{bare.name} is not a Lightning checkpoint.*'weights'"):
        load_task(config, bare)
    with pytest.raises(SystemExit):  # argparse: invalid choice 'tflite'
        main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(tmp_path), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.head.weight"] = torch.zeros(5, 16)  # 5 classes for the config's 3
    wide = tmp_path / "wide.ckpt"
    torch.save(state, wide)
    with pytest.raises(CheckpointError, match=rf"(?s){wide.name} does not fit ClassificationTask.*model\.head\.weight"):
        load_task(config, wide)


def test_safetensors_with_wrong_shapes_names_file_key_and_shape(tmp_path):
    from safetensors.torch import save_file

    from swin.models import load_pretrained

    model = SwinTransformer(**TINY, num_classes=3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(7, 8)
    path = tmp_path / "wrong.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors: layers\.0\.blocks\.0\.mlp\.fc1\.weight.*\(7, 8\)"):
        load_pretrained(SwinTransformer(**TINY, num_classes=3), path)


def test_backbone_safetensors_round_trip_through_timm_and_load_pretrained(tmp_path):
    timm = pytest.importorskip("timm")
    from swin.models import load_pretrained

    config, ckpt, task = _checkpoint(tmp_path, "classification")
    out = tmp_path / "out"
    main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out), "--format", "timm", "safetensors"])
    from safetensors.torch import load_file

    peer = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3
    ).eval()
    peer.load_state_dict(load_file(out / "timm.safetensors"), strict=True)
    ours = SwinTransformer(**TINY, num_classes=3).eval()
    load_pretrained(ours, out / "backbone.safetensors", strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = task(x)
        assert torch.allclose(peer(x), expected, atol=1e-5)
        assert torch.equal(ours(x), expected)


def _clear_caches(model) -> None:
    for cached_function in (relative_position_index, shift_mask, window_index):
        cached_function.cache_clear()
    for module in model.modules():
        if hasattr(module, "_bias_cache"):
            module._bias_cache = None


def test_export_leaves_the_eager_model_and_its_caches_intact(tmp_path):
    """Tensors traced during an export never land in the eager caches (index tables, attention bias): the model
    computes afterwards what it computes from empty caches, and a second export in the same process works."""
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=5).eval()
    x = torch.randn(3, 3, 40, 40)
    _clear_caches(model)  # the export fills them first, as in a fresh process
    export_pt2(model, torch.randn(2, 3, 40, 40), tmp_path / "first.pt2")
    with torch.no_grad():
        after_export = model(x)
        _clear_caches(model)
        clean = model(x)
    torch.testing.assert_close(after_export, clean, rtol=0, atol=0)
    export_pt2(model, torch.randn(2, 3, 40, 40), tmp_path / "second.pt2")
    program = torch.export.load(tmp_path / "second.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), clean, rtol=1e-5, atol=1e-5)


def test_torchvision_layout_loads_strictly_into_torchvision(tmp_path):
    """``--format torchvision``: torchvision's SwinTransformer (V1 from a checkpoint; V2 from a backbone) loads the
    file with strict=True and gives our logits."""
    from safetensors.torch import load_file

    from swin.export import to_torchvision, torchvision_model
    from swin.models.swinv2 import SwinTransformerV2

    config, ckpt, task = _checkpoint(tmp_path, "classification")
    main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--format", "torchvision"])
    peer = torchvision_model(task.backbone).eval()
    peer.load_state_dict(load_file(tmp_path / "out" / "torchvision.safetensors"), strict=True)
    torch.manual_seed(0)
    v2 = SwinTransformerV2(**TINY, num_classes=3).eval()
    with torch.no_grad():
        for p in v2.parameters():  # the zero-initialised biases and scales too
            p.add_(torch.randn_like(p) * 0.02)
    peer_v2 = torchvision_model(v2).eval()
    peer_v2.load_state_dict(to_torchvision(v2), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), task(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peer_v2(x), v2(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no head"):
        torchvision_model(SwinTransformer(**TINY, num_classes=None, out_indices=(0,)))


def test_mask_rcnn_onnx_detects_what_eager_detects(tmp_path):
    """The detector through torchvision's ONNX route: one image of the export's size; boxes, labels, scores and masks
    of onnxruntime against eager fp32, two images; the contract maps labels to category ids; no .pt2."""
    config, ckpt, task = _checkpoint(tmp_path, "detection", class_names=["a", "b", "c"])
    out = tmp_path / "out"
    written = main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out), "--size", "90", "120"])
    assert sorted(p.name for p in written) == ["contract.json", "model.onnx"]  # onnx only by default
    info = json.loads((out / "contract.json").read_text())
    assert info["input"]["size"] == [90, 120] and info["input"]["dynamic"] == []
    assert set(info["output"]) == {"boxes", "labels", "scores", "masks"} and info["category_ids"] == [1, 2, 3]
    for seed in (0, 1):
        image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = task.model([image])[0]
        got = dict(zip(["boxes", "labels", "scores", "masks"], _ort(out / "model.onnx", image)))
        assert len(want["boxes"]) > 10 and got["boxes"].shape == tuple(want["boxes"].shape)
        assert np.array_equal(got["labels"], want["labels"].numpy())
        for name in ("boxes", "scores", "masks"):
            assert np.abs(got[name] - want[name].numpy()).max() <= 1e-3, name  # boxes in pixels: ~1e-5 here
    with pytest.raises(NotImplementedError, match="torch.export"):
        main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(out), "--format", "pt2"])
    cascade = {**TASKS["detection"], "init_args": {**TASKS["detection"]["init_args"], "framework": "cascade_mask_rcnn"}}
    with pytest.raises(NotImplementedError, match="cascade"):
        export_module(build_task(cascade))
