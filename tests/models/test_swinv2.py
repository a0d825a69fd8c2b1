"""Swin V2: parity with torchvision and timm (random weights through every checkpoint layout), the window rules,
the dense pyramid, gradient checkpointing and the parameter counts."""

from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmV2
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from swin.models import SwinTransformerV2, build_swin, build_upernet, swinv2_t
from swin.models.weights import load_pretrained

TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def _randomise(model: torch.nn.Module) -> None:
    """Every parameter random: the continuous-bias MLP, the post-norms and biases too, and logit scales on both
    sides of the log(100) clamp."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.uniform_(0.5, 5.5)
            else:
                p.normal_(0.0, 0.5 if p.ndim == 1 else 0.3)
        for m in model.modules():  # torchvision's V2 keeps the k third of qkv.bias at zero
            if hasattr(m, "qkv") and getattr(m.qkv, "bias", None) is not None:
                c = m.qkv.bias.numel() // 3
                m.qkv.bias[c : 2 * c] = 0.0


def _tv_tiny(window: int = 8) -> torch.nn.Module:
    return torchvision.models.swin_transformer.SwinTransformer(
        [4, 4], TINY["embed_dim"], list(TINY["depths"]), list(TINY["num_heads"]), [window, window],
        num_classes=TINY["num_classes"], block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    ).eval()


def _saved(tmp_path, model: torch.nn.Module, wrap: bool = False):
    path = tmp_path / "peer.pth"
    sd = model.state_dict()
    torch.save({"model": sd} if wrap else sd, path)
    return path


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", [(64, 64), (100, 140), (68, 108)])  # native; not window multiples (torchvision floors the patch grid: multiples of 4)
def test_logits_match_torchvision_through_its_checkpoint(tmp_path, size):
    ref = _tv_tiny()
    _randomise(ref)
    model = SwinTransformerV2(window_size=8, **TINY).eval()
    load_pretrained(model, _saved(tmp_path, ref), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-5


def test_full_swin_v2_t_matches_torchvision_at_256():
    ref = torchvision.models.swin_v2_t().eval()
    _randomise(ref)
    model = swinv2_t().eval()
    load_pretrained(model, ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-5


def _timm_tiny(img_size: int, window: int, depths=(2, 2, 2), heads=(1, 2, 4), pretrained=None) -> TimmV2:
    sizes = pretrained or (0,) * len(depths)
    return TimmV2(
        img_size=img_size, window_size=window, embed_dim=16, depths=depths, num_heads=heads, num_classes=10,
        pretrained_window_sizes=sizes,
    ).eval()


@pytest.mark.parametrize(
    "img_size,window,pretrained",
    [(128, 8, None), (64, 16, (12, 6, 4))],  # maps 32/16/8 (the last one window); 16/8/4: windows shrink to the map
)
def test_logits_match_timm_through_its_checkpoint(tmp_path, img_size, window, pretrained):
    ref = _timm_tiny(img_size, window, pretrained=pretrained)
    _randomise(ref)
    model = SwinTransformerV2(
        window_size=window, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), num_classes=10,
        pretrained_window_sizes=pretrained,
    ).eval()
    load_pretrained(model, _saved(tmp_path, ref), strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-5


def _official_from_timm(ref: TimmV2) -> dict:
    """The official release's layout written from timm's model: downsample at the END of each stage, head without
    ``.fc``, and the buffers the official files carry (its coordinate tables, normalised as the model was)."""
    out = {}
    for k, v in ref.state_dict().items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts).replace("head.fc.", "head.")] = v
    for i, stage in enumerate(ref.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            out[prefix + "attn.relative_coords_table"] = block.attn.relative_coords_table.clone()
            out[prefix + "attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if block.attn_mask is not None:
                out[prefix + "attn_mask"] = block.attn_mask.clone()
    return out


def test_official_layout_carries_the_pretrained_window_sizes(tmp_path):
    """An official file fine-tuned from other windows: the model, built without pretrained_window_sizes, takes
    them from the file's coordinate tables (official and timm shrink the last windows to the map)."""
    ref = _timm_tiny(64, 16, pretrained=(12, 6, 4))
    _randomise(ref)
    official = _official_from_timm(ref)
    assert "layers.0.downsample.reduction.weight" in official and "layers.0.blocks.0.attn.q_bias" in official
    path = tmp_path / "swinv2_official.pth"
    torch.save({"model": official, "epoch": 30}, path)
    model = SwinTransformerV2(window_size=16, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), num_classes=10)
    load_pretrained(model.eval(), path, strict=True)
    assert model.pretrained_window_sizes == (12, 6, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model(x), ref(x)) <= 1e-5
    again = SwinTransformerV2(window_size=16, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), num_classes=10)
    load_pretrained(again.eval(), model.state_dict(), strict=True)  # this project's state dict carries them too
    assert again.pretrained_window_sizes == (12, 6, 4)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_checkpoint_moves_to_another_window(tmp_path):
    """torchvision's window-8 file into a window-16 model: its coordinates are normalised by the window-8
    training, as in timm's model built with pretrained_window_sizes=(8, 8)."""
    ref = _tv_tiny(window=8)
    _randomise(ref)
    path = _saved(tmp_path, ref)
    model = SwinTransformerV2(window_size=16, **TINY).eval()
    load_pretrained(model, path, strict=True)
    assert model.pretrained_window_sizes == (8, 8)
    assert model.layers[0].blocks[0].attn.relative_coords_table.shape == (1, 31, 31, 2)
    peer = TimmV2(
        img_size=64, window_size=16, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10,
        pretrained_window_sizes=(8, 8),
    ).eval()
    load_pretrained(peer_as_ours := SwinTransformerV2(window_size=16, **TINY).eval(), path, strict=True)
    timm_sd = {k.replace("head.", "head.fc."): v for k, v in peer_as_ours.state_dict().items()}
    timm_sd = {  # the official downsample of stage i starts stage i + 1 in timm
        (k.replace("layers.0.downsample", "layers.1.downsample") if "downsample" in k else k): v
        for k, v in timm_sd.items() if not k.endswith("relative_coords_table")
    }
    peer.load_state_dict(timm_sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model(x), peer(x)) <= 1e-5


def test_window_rules():
    block = SwinTransformerV2(window_size=8, **TINY).layers[0].blocks[1]
    assert block.geometry(16, 16) == (8, 16, 16, (4, 4))
    assert block.geometry(8, 20) == (8, 8, 24, (0, 0))  # one side fits the window: no shift (official)
    assert block.geometry(5, 7) == (5, 5, 10, (0, 0))  # the window shrinks to the smaller side
    assert block.geometry(9, 10) == (8, 16, 16, (4, 4))  # larger than one window: V1's padding


def test_dense_pyramid_at_an_odd_size_equals_torchvision_stages():
    ref = _tv_tiny()
    _randomise(ref)
    model = SwinTransformerV2(window_size=8, out_indices=(0, 1), **{**TINY, "num_classes": None}).eval()
    with pytest.warns(UserWarning, match="missing keys"):  # the dense model has norm0 / norm1, no norm / head
        load_pretrained(model, ref.state_dict())
    with torch.no_grad():
        for n in (model.norm0, model.norm1):
            n.weight.normal_(), n.bias.normal_()
        maps = model.forward_features(torch.randn(2, 3, 97, 131))
        assert [tuple(m.shape[1:]) for m in maps] == [(16, 25, 33), (32, 13, 17)]
        assert model.out_channels == [16, 32] and model.out_strides == [4, 8]
        x = torch.randn(2, 3, 100, 140)  # torchvision floors the patch grid: compare where it needs no padding
        maps = model.forward_features(x)
        for i, norm in enumerate((model.norm0, model.norm1)):
            expected = norm(ref.features[: 2 * i + 2](x)).permute(0, 3, 1, 2)
            assert _max_diff(maps[i], expected) <= 1e-5 * expected.abs().max().item()


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = SwinTransformerV2(window_size=8, drop_path_rate=0.0, **TINY)
    _randomise(plain)
    ckpt = SwinTransformerV2(window_size=8, drop_path_rate=0.0, grad_checkpointing=True, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 72, 100)
    for m in (plain, ckpt):
        m.train()
        m(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("autocast", [False, True])
def test_sdpa_pieces_and_explicit_softmax_agree(autocast):
    whole = SwinTransformerV2(window_size=8, fused_attn=False, piece_tokens=0, out_indices=(0, 1), **TINY).eval()
    _randomise(whole)
    fast = SwinTransformerV2(window_size=8, piece_tokens=100, out_indices=(0, 1), **TINY).eval()
    fast.load_state_dict(whole.state_dict())
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        got, expected = [fast(x), *fast.forward_features(x)], [whole(x), *whole.forward_features(x)]
    for a, b in zip(got, expected):
        assert _max_diff(a.float(), b.float()) <= (5e-2 * b.abs().max().item() if autocast else 1e-5)


def test_parameter_counts_equal_the_peers():
    """timm's and the official models have q and v biases; torchvision counts a zero k bias too (C per block)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    timm_names = {"t": "swinv2_tiny_window8_256", "s": "swinv2_small_window8_256", "b": "swinv2_base_window8_256"}
    with torch.device("meta"):
        for v, name in timm_names.items():
            ours = build_swin(f"swinv2_{v}")
            tv = getattr(torchvision.models, f"swin_v2_{v}")()
            zero_k_bias = sum(m.qkv.bias.numel() // 3 for m in tv.modules() if hasattr(m, "logit_scale"))
            assert count(ours) == count(timm.create_model(name)) == count(tv) - zero_k_bias


def test_v2_is_a_backbone_for_every_head():
    backbone = build_swin("swinv2_t", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                          out_indices=(0, 1, 2, 3), num_classes=None)
    assert isinstance(backbone, SwinTransformerV2)
    segmentor = build_upernet(backbone, num_classes=3, channels=16, aux_channels=8).eval()
    with torch.no_grad():
        assert segmentor(torch.randn(1, 3, 70, 90)).shape == (1, 3, 70, 90)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        swinv2_t(rel_pos_bias=False)
    names = {n for n, p in swinv2_t().named_parameters()}
    assert {"layers.0.blocks.0.attn.q_bias", "layers.0.blocks.0.attn.v_bias"} <= names
    assert not any(n.endswith("attn.qkv.bias") for n in names)


@pytest.mark.parametrize(
    "config",
    sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*swinv2*.yaml")),
    ids=lambda p: p.name,
)
def test_v2_configs_build_their_backbone(config):
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    with torch.device("meta"):
        backbone = build_swin(init["backbone"], **init.get("backbone_kwargs", {}))
    assert isinstance(backbone, SwinTransformerV2) and backbone.window_size == 8
