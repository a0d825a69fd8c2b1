"""load_pretrained: every layout, interpolation to another window, heads, prefixes, and bad files."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from swin.models import build_swin, swin_t
from swin.models.swin import PatchMerging
from swin.models.weights import CheckpointError, detect_format, load_pretrained, read_state_dict

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def _small(**kw):
    model = build_swin("custom", **{**SMALL, **kw})
    for n, p in model.named_parameters():
        if "relative_position_bias_table" in n:
            torch.nn.init.normal_(p)
    return model


def _to_mmlab(sd: dict) -> dict:
    """OpenMMLab's own converter (mmdet ``swin_converter``), official → mmdet, written from its documented rules."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head") or k == "norm.weight" or k == "norm.bias":
            continue
        if k.startswith("layers"):
            if "attn." in k:
                k = k.replace("attn.", "attn.w_msa.")
            elif "mlp.fc1." in k:
                k = k.replace("mlp.fc1.", "ffn.layers.0.0.")
            elif "mlp.fc2." in k:
                k = k.replace("mlp.fc2.", "ffn.layers.1.")
            elif "downsample.reduction" in k:
                o, i = v.shape
                v = v.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
            elif "downsample.norm" in k:
                v = v.reshape(4, -1)[[0, 2, 1, 3], :].transpose(0, 1).reshape(-1)
            k = k.replace("layers", "stages", 1)
        elif k.startswith("patch_embed.proj"):
            k = k.replace("proj", "projection")
        out["backbone." + k] = v
    return out


def test_mmlab_merge_order_is_nn_unfold_order():
    """The converted weights applied the OpenMMLab way (nn.Unfold, channel-major) equal our PatchMerging."""
    merge = PatchMerging(8)
    torch.nn.init.normal_(merge.norm.weight)
    torch.nn.init.normal_(merge.norm.bias)
    mm = _to_mmlab({f"layers.0.downsample.{k}": v for k, v in merge.state_dict().items()})
    x = torch.randn(2, 6, 10, 8)
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    w, b = mm["backbone.stages.0.downsample.norm.weight"], mm["backbone.stages.0.downsample.norm.bias"]
    theirs = F.layer_norm(cols, (32,), w, b) @ mm["backbone.stages.0.downsample.reduction.weight"].t()
    ours = merge(x).reshape(2, -1, 16)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_mmlab_detector_checkpoint_with_backbone_prefix(tmp_path):
    src = _small(out_indices=(0, 1, 2, 3), num_classes=None).eval()
    for i in range(4):
        torch.nn.init.normal_(getattr(src, f"norm{i}").weight)
    ckpt = _to_mmlab(src.state_dict())
    ckpt["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    ckpt["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    path = tmp_path / "mask_rcnn_swin.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": ckpt}, path)
    assert detect_format(read_state_dict(path)) == "mmlab"
    dst = _small(out_indices=(0, 1, 2, 3), num_classes=None).eval()
    load_pretrained(dst, path, strict=True)
    x = torch.randn(1, 3, 60, 92)
    with torch.no_grad():
        for a, b in zip(src.forward_features(x), dst.forward_features(x)):
            assert torch.allclose(a, b, atol=1e-6)


def test_lightning_checkpoint_of_a_task(tmp_path):
    src = _small(num_classes=7).eval()
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(3)
    path = tmp_path / "epoch=0-step=10.ckpt"
    torch.save({"state_dict": state, "epoch": 0, "global_step": 10, "hyper_parameters": {"lr": 1e-3}}, path)
    dst = _small(num_classes=7).eval()
    load_pretrained(dst, path, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_relative_position_tables_are_interpolated_bicubically():
    src = _small(window_size=4)
    dst = _small(window_size=6)
    load_pretrained(dst, src.state_dict(), strict=True)
    table = src.layers[1].blocks[0].attn.relative_position_bias_table  # (49, nH)
    expected = F.interpolate(
        table.detach().t().reshape(1, -1, 7, 7), size=(11, 11), mode="bicubic", align_corners=False
    ).reshape(-1, 121).t()
    assert torch.allclose(dst.layers[1].blocks[0].attn.relative_position_bias_table, expected)


def test_absolute_position_embedding_is_interpolated():
    src = _small(ape=True, img_size=64)
    dst = _small(ape=True, img_size=96)
    load_pretrained(dst, src.state_dict(), strict=True)
    assert dst.absolute_pos_embed.shape == (1, 24 * 24, 32)
    grid = src.absolute_pos_embed.detach().transpose(1, 2).reshape(1, 32, 16, 16)
    expected = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(dst.absolute_pos_embed, expected)


def test_head_with_other_class_count_is_dropped_with_a_warning():
    src = _small(num_classes=10)
    dst = _small(num_classes=3)
    before = dst.head.weight.clone()
    with pytest.warns(UserWarning, match="dropped the checkpoint's head"):
        load_pretrained(dst, src.state_dict())
    assert torch.equal(dst.head.weight, before)
    assert torch.equal(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_missing_and_unexpected_keys_reported_in_one_message():
    src = _small(num_classes=3)
    sd = src.state_dict()
    del sd["layers.0.blocks.0.norm1.weight"]
    sd["layers.0.blocks.0.extra"] = torch.zeros(1)
    dst = _small(num_classes=3)
    with pytest.warns(UserWarning, match=r"missing keys \(1\).*norm1.weight.*unexpected keys \(1\).*extra"):
        load_pretrained(dst, sd)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_pretrained(dst, sd, strict=True)


def test_classification_checkpoint_into_dense_backbone_reports_norms():
    src = _small(num_classes=10)
    dst = _small(num_classes=None, out_indices=(0, 1, 2, 3))
    with pytest.warns(UserWarning) as record:
        result = load_pretrained(dst, src.state_dict())
    assert sorted(result.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert "head.weight" in result.unexpected_keys
    assert "norm0.weight" in str(record[0].message)


def test_not_a_checkpoint_names_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_pretrained(swin_t(), text)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(swin_t(), tmp_path / "nowhere.pth")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, resnet)
    with pytest.raises(CheckpointError, match="resnet.pth.*no Swin patch embedding"):
        load_pretrained(swin_t(), resnet)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_arbitrary_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
        load_pretrained(swin_t(), path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out
