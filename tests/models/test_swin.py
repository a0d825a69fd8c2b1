"""The backbone: exact parity with timm and torchvision, the official layout, shapes, FLOPs and parameter counts."""

import pytest
import timm
import torch
import torchvision

from swin.models import build_swin, count_flops, swin_t
import swin.models.swin as swin_module
from swin.models.ops import Linear
from swin.models.swin import SwinBlock, shift_mask, window_geometry, window_partition
from swin.models.weights import load_pretrained

TIMM_NAMES = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}


def _randomise_tables(model: torch.nn.Module) -> None:
    """Random weights everywhere, including the relative position tables (zeros would hide index errors)."""
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=1.0)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", ["swin_t", "swin_s", "swin_b"])
def test_logits_match_timm(variant):
    ref = timm.create_model(TIMM_NAMES[variant], pretrained=False).eval()
    _randomise_tables(ref)
    model = build_swin(variant).eval()
    load_pretrained(model, ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-6


@pytest.mark.parametrize(
    "variant,sizes",
    # 224x96: from stage 3 on the width fits one window (no shift across it) while the height does not
    [("swin_t", [(224, 224), (228, 300), (100, 68), (224, 96)]), ("swin_s", [(224, 224)]), ("swin_b", [(224, 224), (100, 68)])],
)
def test_logits_match_torchvision(variant, sizes):
    ref = getattr(torchvision.models, variant)().eval()
    _randomise_tables(ref)
    model = build_swin(variant).eval()
    load_pretrained(model, ref.state_dict(), strict=True)
    for size in sizes:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert _max_diff(model(x), ref(x)) <= 2e-6, size  # 0.5-1.1e-6 measured, by CPU and depth


def _official_state_dict_from_timm(ref: torch.nn.Module, model) -> dict:
    """The official release's layout, written from timm's independently: downsample at the END of each stage,
    head without ``.fc``, and the ``relative_position_index`` / ``attn_mask`` buffers the official files carry."""
    out = {}
    for k, v in ref.state_dict().items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        k = ".".join(parts).replace("head.fc.", "head.")
        out[k] = v
    for i, stage in enumerate(model.layers):
        for j, _ in enumerate(stage.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    return out


def test_official_layout_round_trip(tmp_path):
    ref = timm.create_model(TIMM_NAMES["swin_t"], pretrained=False).eval()
    _randomise_tables(ref)
    model = swin_t().eval()
    official = _official_state_dict_from_timm(ref, model)
    assert sum(k.startswith("layers.0.downsample.") for k in official) == 3  # norm.weight, norm.bias, reduction.weight
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": official}, path)
    load_pretrained(model, path, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-6
    # and back: this project's state dict is the official layout (without the buffers)
    again = swin_t().eval()
    load_pretrained(again, model.state_dict(), strict=True)
    with torch.no_grad():
        assert _max_diff(again(x), ref(x)) <= 1e-6


@pytest.mark.parametrize("size,expected", [((223, 301), [(56, 76), (28, 38), (14, 19), (7, 10)]), ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)])])
def test_pyramid_shapes_at_any_size(size, expected):
    model = swin_t(out_indices=(0, 1, 2, 3), num_classes=None).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, *size))
    assert [tuple(m.shape[2:]) for m in maps] == expected
    assert [m.shape[1] for m in maps] == model.out_channels == [96, 192, 384, 768]
    assert model.out_strides == [4, 8, 16, 32]


def test_dense_outputs_are_normed_pre_downsample_stage_maps():
    model = swin_t(out_indices=(1, 3)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps = model.forward_features(x)
        h = model._embed(x)
        _, h = model.layers[0](h)
        before, _ = model.layers[1](h)
        expected = model.norm1(before).permute(0, 3, 1, 2)
    assert len(maps) == 2 and torch.allclose(maps[0], expected, atol=1e-6)
    extra = {n for n, _ in model.named_parameters()} - {n for n, _ in swin_t().named_parameters()}
    assert extra == {"norm1.weight", "norm1.bias", "norm3.weight", "norm3.bias"}


def test_shift_mask_matches_official_construction():
    height, width, ws, s = 14, 21, 7, 3
    img_mask = torch.zeros(1, height, width, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for w in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    windows = window_partition(img_mask, ws).squeeze(-1)
    official = (windows.unsqueeze(1) - windows.unsqueeze(2)).ne(0).float() * -100.0
    assert torch.equal(shift_mask(height, width, ws, (s, s)), official)


def test_window_geometry_pads_to_window_multiples_and_shifts_only_where_the_map_exceeds_one_window():
    assert window_geometry(7, 7, 7, shifted=True) == (7, 7, (0, 0))  # stage 4 at 224: one window, no shift
    assert window_geometry(14, 6, 7, shifted=True) == (14, 7, (3, 0))  # 224x96 at stride 16: W fits one window
    assert window_geometry(14, 7, 7, shifted=True) == (14, 7, (3, 0))  # shift only along H
    assert window_geometry(10, 5, 7, shifted=True) == (14, 7, (3, 0))  # padded first, then the rule
    assert window_geometry(10, 5, 7, shifted=False) == (14, 7, (0, 0))
    assert window_geometry(8, 9, 4, shifted=True) == (8, 12, (2, 2))


@pytest.mark.parametrize("size,same", [((7, 7), True), ((5, 6), True), ((14, 7), False), ((7, 10), False)])
def test_shifted_block_equals_unshifted_where_the_map_fits_in_one_window(size, same):
    shifted = SwinBlock(32, 2, window_size=7, shifted=True).eval()
    plain = SwinBlock(32, 2, window_size=7, shifted=False).eval()
    _randomise_tables(shifted)
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        assert torch.equal(shifted(x), plain(x)) == same


def test_sdpa_equals_explicit_softmax():
    fused = swin_t(out_indices=(0, 1, 2, 3)).eval()
    _randomise_tables(fused)
    explicit = swin_t(out_indices=(0, 1, 2, 3), fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 100, 132)
    with torch.no_grad():
        assert _max_diff(fused(x), explicit(x)) <= 1e-5
        for a, b in zip(fused.forward_features(x), explicit.forward_features(x)):
            assert _max_diff(a, b) <= 1e-5


# bf16 on ATen's path is left out: ATen's bf16 GEMM rounds by the row count beyond bf16's own precision
@pytest.mark.parametrize("kernels,autocast", [("onednn", False), ("onednn", True), ("aten", False), ("auto", False)])
@pytest.mark.parametrize("size", [(112, 224), (97, 131)])  # unpadded stages 1-3; every stage padded, odd sizes
def test_inference_in_pieces_equals_the_whole_map(kernels, autocast, size, monkeypatch):
    monkeypatch.setenv("SWIN_KERNELS", kernels)
    whole = swin_t(out_indices=(0, 1, 2, 3), piece_tokens=0).eval()
    _randomise_tables(whole)
    pieces = swin_t(out_indices=(0, 1, 2, 3), piece_tokens=100).eval()  # one window of each of 2 images a piece
    pieces.load_state_dict(whole.state_dict())
    calls = []
    original = swin_module.run_in_pieces
    monkeypatch.setattr(swin_module, "run_in_pieces", lambda *a: calls.append(a[0]) or original(*a))
    x = torch.randn(2, 3, *size)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        expected, got = [*whole.forward_features(x), whole(x)], [*pieces.forward_features(x), pieces(x)]
    assert len(calls) == 2 * 12  # every block, twice
    paths = [{m.onednn for m in model.modules() if isinstance(m, Linear)} for model in (whole, pieces)]
    assert paths[0] == paths[1] and len(paths[0]) == 1  # one timed choice per architecture: the same path
    for a, b in zip(expected, got):
        assert a.shape == b.shape and a.dtype == b.dtype and b.is_contiguous()
        if not autocast and kernels == "onednn":  # fp32: oneDNN's kernels on the same windows, bitwise equal
            assert torch.equal(a, b), _max_diff(a, b)
        elif not autocast:  # the same kernels; ATen's BLAS may block rows differently
            error = ((a - b).norm() / a.norm()).item()
            assert error <= 1e-6, error
        else:  # bf16: bitwise on AMD EPYC; on Intel Xeon (AMX) oneDNN's bf16 GEMMs round by the row count (0.5 %)
            error = ((a.float() - b.float()).norm() / a.float().norm()).item()
            assert error <= 2.0**-7, error  # within bf16's own precision
    with torch.no_grad():
        pieces.train()  # training mode (dropout, drop path) never runs in pieces
        pieces.forward_features(x)
    assert len(calls) == 2 * 12


def test_gradient_checkpointing_gives_same_gradients():
    small = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0)
    plain = build_swin("custom", **small, num_classes=5)
    ckpt = build_swin("custom", **small, num_classes=5, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 72)
    for m in (plain, ckpt):
        m(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_compiles_without_graph_breaks():
    model = build_swin("custom", embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=3).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert _max_diff(compiled(x), model(x)) <= 1e-5


@pytest.mark.parametrize(
    "variant,kwargs,params",
    [
        ("swin_t", {}, 28_288_354),
        ("swin_s", {}, 49_606_258),
        ("swin_b", {}, 87_768_224),
        ("swin_l", {}, 196_532_476),
        ("swin_b", {"window_size": 12}, 87_903_584),
    ],
)
def test_parameter_counts(variant, kwargs, params):
    with torch.device("meta"):
        model = build_swin(variant, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize(
    "variant,kwargs,size,gmacs,digits",  # the README's table, to the digits it prints
    [
        ("swin_t", {}, 224, 4.49, 2),
        ("swin_s", {}, 224, 8.75, 2),
        ("swin_b", {}, 224, 15.44, 2),
        ("swin_l", {}, 224, 34.49, 2),
        ("swin_b", {"window_size": 12}, 384, 47.1, 1),
    ],
)
def test_flops(variant, kwargs, size, gmacs, digits):
    with torch.device("meta"):
        model = build_swin(variant, **kwargs)
    assert round(count_flops(model, size) / 1e9, digits) == gmacs


def test_flops_grow_linearly_with_pixels():
    with torch.device("meta"):
        model = swin_t()
    ratio = count_flops(model, 896) / count_flops(model, 224)
    assert 15.5 < ratio < 16.5


@pytest.mark.parametrize("shape", [(3, 224, 224), (2, 1, 64, 64), (0, 3, 64, 64), (1, 3, 0, 64)])
def test_bad_input_shapes(shape):
    model = build_swin("custom", embed_dim=16, depths=(1,), num_heads=(1,), window_size=4, num_classes=2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(shape))


def test_frozen_stages_follow_official_semantics():
    model = build_swin("custom", embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 1), window_size=4, frozen_stages=2)
    model.train()
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    assert not model.layers[0].training and model.layers[1].training
