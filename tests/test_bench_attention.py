"""The Table 5 benchmark computes what it claims: padding the shifted windows gives ours (cyclic shift + mask), and
sliding-window attention is attention over each query's neighbourhood with the relative position bias."""

import json

import pytest
import torch

from swin.bench import attention as bench
from swin.bench import main as bench_main
from swin.models.swin import WindowAttention


def _attention(dim: int, window: int, heads: int) -> WindowAttention:
    torch.manual_seed(0)
    attn = WindowAttention(dim, window, heads).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # a bias large enough to matter
        attn.qkv.bias.normal_()  # zero tokens give non-zero keys and values
    return attn


def _reference(attn: WindowAttention, x: torch.Tensor, keys) -> torch.Tensor:
    """Attention of every query of (1, H, W, C) over ``keys(i, j)`` (a list of key positions), one query at a time,
    with the bias looked up from the query-minus-key offset."""
    _, h, w, c = x.shape
    m, heads, hd = attn.window_size, attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x[0]).view(h, w, 3, heads, hd).unbind(2)
    table = attn.relative_position_bias_table
    out = torch.zeros(h, w, heads, hd)
    for i in range(h):
        for j in range(w):
            pos = keys(i, j)
            logits = torch.stack([(q[i, j] * k[a, b]).sum(-1) * hd**-0.5 + table[(i - a + m - 1) * (2 * m - 1)
                                  + (j - b + m - 1)] for a, b in pos])  # fmt: skip
            weights = logits.softmax(0)  # (K, heads)
            out[i, j] = sum(weights[n][:, None] * v[a, b] for n, (a, b) in enumerate(pos))
    return attn.proj(out.reshape(1, h, w, c))


@pytest.mark.parametrize(
    "size, window",
    [((9, 11), 4), ((10, 13), 5), ((4, 9), 5), ((14, 14), 7), ((7, 7), 7), ((12, 6), 3)],
    ids=["even-window", "odd-window", "one-window-high", "window-multiple", "one-window", "odd-shift"],
)
def test_padding_the_shifted_windows_equals_cyclic_shift_and_mask(size, window):
    attn = _attention(8, window, 2)
    x = torch.randn(2, *size, 8)
    with torch.no_grad():
        ours = bench.CyclicShiftAttention(attn)(x)
        padded = bench.padded_attention(attn, x)
        unshifted = bench.CyclicShiftAttention(attn)
        unshifted.shifted = False
        plain = unshifted(x)
    assert padded.shape == ours.shape == x.shape
    assert (padded - ours).abs().max() <= 1e-5
    pad_h, pad_w = -(-size[0] // window) * window, -(-size[1] // window) * window
    if max(pad_h, pad_w) > window:  # the block shifts: a test that would catch unshifted windows
        assert (padded - plain).abs().max() > 1e-3
    rows, cols = (-(-s // window) + (p > window) for s, p in zip(size, (pad_h, pad_w)))
    assert bench.padding_mask(*size, window, x.device).shape[0] == rows * cols  # (⌈H/M⌉+1)·(⌈W/M⌉+1) where shifted


def test_sliding_window_covering_the_map_is_full_attention_with_the_bias():
    attn = _attention(8, 7, 2)  # neighbourhood ±3: covers every key of a 4×3 map from every query
    x = torch.randn(1, 4, 3, 8)
    with torch.no_grad():
        got = bench.sliding_attention(attn, x, bench.sliding_bias(attn, 4, 3))
        everything = [(a, b) for a in range(4) for b in range(3)]
        expected = _reference(attn, x, lambda i, j: everything)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [3, 4])
def test_sliding_window_attends_to_each_querys_neighbourhood(window):
    attn = _attention(8, window, 2)
    h, w = 6, 5
    lo, hi = window // 2, window - 1 - window // 2
    x = torch.randn(2, h, w, 8)

    def neighbours(i: int, j: int) -> list[tuple[int, int]]:
        rows, cols = range(max(0, i - lo), min(h, i + hi + 1)), range(max(0, j - lo), min(w, j + hi + 1))
        return [(a, b) for a in rows for b in cols]

    with torch.no_grad():
        got = bench.sliding_attention(attn, x, bench.sliding_bias(attn, h, w))
        for n in range(2):
            expected = _reference(attn, x[n : n + 1], neighbours)
            assert (got[n : n + 1] - expected).abs().max() <= 1e-5


def test_attention_mode_prints_and_writes_the_table(tmp_path, capsys):
    args = ["--attention", "--variant", "micro", "--sizes", "32,40x56", "--repeats", "2", "--min-time", "0"]
    report = bench_main([*args, "--threads", "1", "--out", str(tmp_path)])
    assert report["errors"] == [] and json.loads((tmp_path / "attention.json").read_text()) == report
    rows = report["rows"]
    assert [(r["size"], r["stage"], r["height"], r["width"]) for r in rows] == [
        ([32, 32], 1, 8, 8), ([32, 32], 2, 4, 4), ([40, 56], 1, 10, 14), ([40, 56], 2, 5, 7)
    ]
    for r in rows:
        assert all(r["ms"][name] > 0 for name in bench.METHODS) and set(r["ratio"]) == {"padding", "sliding"}
        assert r["padding_max_diff"] <= 1e-5
    assert rows[0]["windows"] == {"ours": 4, "padding": 9} and rows[1]["windows"] == {"ours": 1, "padding": 1}
    table = (tmp_path / "attention.md").read_text()
    assert "| 40×56 | 2 | 5×7 | 32 | 2 |" in table and "padding ÷ ours" in table and "family" in table
    assert table in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "swinv2_t"])
