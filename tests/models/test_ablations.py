"""The paper's Table 4 ablations as V1 switches: each changes what it names and nothing else."""

import pytest
import torch

from swin.models import SwinTransformer

TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=10, drop_path_rate=0.0)


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False])
def test_no_shift_is_the_model_with_every_block_unshifted(fused):
    shifted = _randomised(SwinTransformer(fused_attn=fused, **TINY))
    plain = SwinTransformer(shift=False, fused_attn=fused, **TINY).eval()
    assert _shapes(plain) == _shapes(shifted)  # the same parameters
    plain.load_state_dict(shifted.state_dict(), strict=True)
    assert [b.shifted for s in plain.layers for b in s.blocks] == [False] * 4
    x = torch.randn(2, 3, 44, 52)
    with torch.no_grad():
        with_shift = shifted(x)
        for stage in shifted.layers:  # the same computation, unshifted by hand
            for block in stage.blocks:
                block.shifted = False
        assert torch.equal(plain(x), shifted(x))
        assert not torch.allclose(plain(x), with_shift)


@pytest.mark.parametrize("fused", [True, False])
def test_no_relative_position_bias_drops_exactly_the_tables(fused):
    full = _randomised(SwinTransformer(fused_attn=fused, **TINY))
    ablated = SwinTransformer(rel_pos_bias=False, fused_attn=fused, **TINY).eval()
    dropped = set(_shapes(full)) - set(_shapes(ablated))
    assert dropped == {f"layers.{i}.blocks.{j}.attn.relative_position_bias_table" for i in (0, 1) for j in (0, 1)}
    assert set(_shapes(ablated)) < set(_shapes(full))
    assert ablated.load_state_dict(full.state_dict(), strict=False).unexpected_keys == sorted(dropped)
    x = torch.randn(2, 3, 44, 52)
    with torch.no_grad():
        with_bias = full(x)
        for name, p in full.named_parameters():  # a zero table is no bias
            if name.endswith("relative_position_bias_table"):
                p.zero_()
        assert torch.allclose(ablated(x), full(x), atol=1e-6)
        assert not torch.allclose(ablated(x), with_bias, atol=1e-3)


def test_absolute_position_embedding_adds_one_parameter():
    plain, ape = SwinTransformer(**TINY), SwinTransformer(ape=True, img_size=48, **TINY)
    assert set(_shapes(ape)) - set(_shapes(plain)) == {"absolute_pos_embed"}
    assert _shapes(ape)["absolute_pos_embed"] == (1, 12 * 12, 16)
