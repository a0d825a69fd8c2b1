"""The CPU fast paths: the oneDNN custom ops pass torch.library's checks and equal F.linear, values and gradients."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from swin.models import ops

pytestmark = pytest.mark.skipif(not ops._ONEDNN, reason="oneDNN is not available in this torch build")

#: every combination the custom op sees: fp32 / bf16, with and without bias, contiguous or strided weight, GELU or not
LINEAR_CASES = pytest.mark.parametrize(
    "dtype,bias,strided,gelu", list(itertools.product([torch.float32, torch.bfloat16], *[[False, True]] * 3))
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(dtype: torch.dtype, bias: bool, strided: bool, grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(dtype)
    weight = torch.randn(24, 40, generator=g).to(dtype).t() if strided else torch.randn(40, 24, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    for t in (x, weight, b):
        if t is not None:
            t.requires_grad_(grad)
    return x, weight, b


@LINEAR_CASES
def test_onednn_linear_passes_opcheck(dtype, bias, strided, gelu):
    x, weight, b = _inputs(dtype, bias, strided, grad=True)
    torch.library.opcheck(ops._onednn_linear, (x, weight, b, gelu))


@pytest.mark.parametrize("shape", [((6, 24), (24, 40)), ((40, 24), (24, 6))])  # both orientations of the kernel
def test_onednn_mm_passes_opcheck_and_equals_matmul(shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(*shape[0], generator=g), torch.randn(*shape[1], generator=g)
    torch.library.opcheck(ops._onednn_mm, (a, b))
    torch.testing.assert_close(ops._onednn_mm(a, b), a @ b, **TOL[torch.float32])


@LINEAR_CASES
def test_custom_op_values_and_gradients_equal_f_linear(dtype, bias, strided, gelu):
    """The op called directly (with its own backward, the GELU recomputed) against ATen's linear + GELU."""
    x, weight, b = _inputs(dtype, bias, strided, grad=True)
    ref_inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, b)]
    out = ops._onednn_linear(x, weight, b, gelu)
    ref = F.linear(*ref_inputs)
    ref = F.gelu(ref) if gelu else ref
    torch.testing.assert_close(out, ref, **TOL[dtype])
    upstream = torch.randn_like(ref)
    out.backward(upstream)
    ref.backward(upstream)
    for got, want in zip((x, weight, b), ref_inputs):
        if got is not None:
            assert got.grad is not None and got.grad.shape == got.shape
            torch.testing.assert_close(got.grad, want.grad, **TOL[dtype])


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_layer_equals_nn_linear_in_training_and_in_packed_inference(dtype, gelu, onednn, monkeypatch):
    monkeypatch.setenv("SWIN_KERNELS", "auto")  # the layer's own path, not the suite's forced one
    fast = ops.Linear(24, 40).to(dtype)
    fast.onednn = onednn
    plain = torch.nn.Linear(24, 40).to(dtype)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 7, 24).to(dtype)
    act = F.gelu if gelu else (lambda t: t)
    fast(x, gelu=gelu).sum().backward()
    act(plain(x)).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, **TOL[dtype])
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, **TOL[dtype])
    with torch.no_grad():
        first = fast(x, gelu=gelu)
        assert fast._packed is not None  # weights cast once for inference, and packed on the oneDNN path
        assert (fast._packed[3] is not None) == onednn
        torch.testing.assert_close(first, act(plain(x)), **TOL[dtype])
        fast.weight.add_(1.0)  # a changed parameter invalidates the packed copy
        plain.weight.add_(1.0)
        torch.testing.assert_close(fast(x, gelu=gelu), act(plain(x)), **TOL[dtype])


@pytest.mark.parametrize("onednn", [False, True])
def test_linear_follows_cpu_autocast(onednn, monkeypatch):
    monkeypatch.setenv("SWIN_KERNELS", "auto")
    layer = ops.Linear(16, 8)
    layer.onednn = onednn
    x = torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, **TOL[torch.bfloat16])


def test_token_gather_backward_is_the_inverse_gather():
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(12)
    x = torch.randn(2, 12, 3, requires_grad=True)
    y = ops.gather_tokens(x, perm, inverse)
    assert torch.equal(y, x.index_select(1, perm))
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    (want,) = torch.autograd.grad(x.index_select(1, perm), x, upstream)
    assert torch.equal(grad, want)


def test_run_in_pieces_equals_one_piece():
    tokens = torch.randn(2, 12, 4)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    seen = []

    def fn(part, positions):
        seen.append((positions.start, positions.stop))
        return part * 2 + positions.start

    out = ops.run_in_pieces(fn, tokens, order, 5)
    assert seen == [(0, 5), (5, 10), (10, 12)]
    expected = torch.empty_like(tokens)
    for start in (0, 5, 10):
        index = order[start : start + 5]
        expected[:, index] = tokens[:, index] * 2 + start
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# The kernel choice: one path per model, timed once per input kind, cached per machine, forced by SWIN_KERNELS
# ---------------------------------------------------------------------------------------------------------------

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3)


def tiny_swin():
    from swin.models import build_swin

    return build_swin("custom", **TINY)


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty cache file of the test's own, and a count of the oneDNN calls."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("SWIN_KERNEL_CACHE", str(path))
    monkeypatch.setenv("SWIN_KERNELS", "auto")
    calls = []
    original = ops._onednn_linear
    monkeypatch.setattr(ops, "_onednn_linear", lambda *a: calls.append(a[0].shape) or original(*a))
    return path, calls


def _fake_timings(monkeypatch, aten_s: float, onednn_s: float) -> list:
    timed = []
    monkeypatch.setattr(ops, "_time_model", lambda model, fn, x, grad: timed.append(grad) or (aten_s, onednn_s))
    return timed


def _paths(model) -> set[bool]:
    return {m.onednn for m in model.modules() if isinstance(m, ops.Linear)}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("aten_s,onednn_s,chosen", [(1.0, 0.5, "onednn"), (1.0, 0.96, "onednn"), (1.0, 0.98, "aten"), (0.5, 1.0, "aten")])
def test_one_path_for_the_whole_model_chosen_with_a_margin_and_remembered(kernel_cache, monkeypatch, aten_s,
                                                                         onednn_s, chosen, grad):
    path, calls = kernel_cache
    timed = _fake_timings(monkeypatch, aten_s, onednn_s)
    model = tiny_swin().train(grad)
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            model(x)
    assert timed == [grad]  # timed once for this model and input kind, then taken from the cache
    assert _paths(model) == {chosen == "onednn"}  # every linear layer on the one path
    assert bool(calls) == (chosen == "onednn")
    (key, value), = json.loads(path.read_text())[ops._machine()].items()
    assert value == (chosen == "onednn") and key.startswith("train" if grad else "infer")
    assert "SwinTransformer" in key and "tokens~2048" in key  # 2 images of 32 x 32
    # a new process (cache reloaded from the file) takes the same path without timing again
    monkeypatch.setattr(ops, "_cache_loaded", None)
    monkeypatch.setattr(ops, "_time_model", lambda *a: pytest.fail("timed again despite the cache file"))
    assert ops.kernel_choices() == {key: chosen}
    with torch.set_grad_enabled(grad):
        tiny_swin().train(grad)(x)


@pytest.mark.parametrize("mode", ["aten", "onednn"])
def test_swin_kernels_forces_a_path_without_timing(kernel_cache, monkeypatch, mode):
    _, calls = kernel_cache
    monkeypatch.setenv("SWIN_KERNELS", mode)
    monkeypatch.setattr(ops, "_time_model", lambda *a: pytest.fail("timed although the path is forced"))
    with torch.no_grad():
        tiny_swin().eval()(torch.randn(1, 3, 32, 32))
    assert bool(calls) == (mode == "onednn")
    monkeypatch.setenv("SWIN_KERNELS", "mkl")
    with pytest.raises(ValueError, match="SWIN_KERNELS='mkl'"):
        ops.linear(torch.randn(4, 24), torch.randn(40, 24))


def test_timing_runs_both_paths_and_leaves_gradients_and_the_random_stream_alone(kernel_cache):
    """Dropout and drop path draw from the global stream: a run that times must draw what a run reading the cache
    draws; and the timed backward must not add to the parameters' gradients."""
    _, calls = kernel_cache
    model = build_dropping_swin()
    x = torch.randn(2, 3, 32, 32)
    for grad in (False, True):
        state = torch.get_rng_state()
        with torch.set_grad_enabled(grad):
            aten_s, onednn_s = ops._time_model(model, model._logits, x, grad)
        assert 0 < aten_s < 10 and 0 < onednn_s < 10 and calls
        assert torch.equal(torch.get_rng_state(), state)
        assert all(p.grad is None for p in model.parameters())


def build_dropping_swin():
    from swin.models import build_swin

    return build_swin("custom", **TINY, drop_rate=0.1, drop_path_rate=0.2).train()


def test_an_unreadable_cache_file_is_reported_and_replaced(kernel_cache, monkeypatch):
    path, _ = kernel_cache
    path.write_text("{not json")
    _fake_timings(monkeypatch, 1.0, 0.5)
    with pytest.warns(UserWarning, match="kernels.json is unreadable"), torch.no_grad():
        tiny_swin().eval()(torch.randn(1, 3, 32, 32))
    assert json.loads(path.read_text())[ops._machine()]


def test_a_choice_another_process_wrote_meanwhile_is_taken(kernel_cache, monkeypatch, tmp_path):
    path, calls = kernel_cache
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setenv("SWIN_KERNEL_CACHE", str(tmp_path / "elsewhere.json"))
    _fake_timings(monkeypatch, 0.5, 1.0)
    with torch.no_grad():
        tiny_swin().eval()(x)
    (key,) = ops.kernel_choices()  # the key this model and input take, ATen chosen
    monkeypatch.setenv("SWIN_KERNEL_CACHE", str(path))
    assert ops.kernel_choices() == {}  # this process has read the (empty) cache
    path.write_text(json.dumps({ops._machine(): {key: True}}))  # e.g. DDP rank 0, while rank 1 was busy
    monkeypatch.setattr(ops, "_time_model", lambda *a: pytest.fail("timed although the choice was on file"))
    calls.clear()
    with torch.no_grad():
        tiny_swin().eval()(x)
    assert calls and ops.kernel_choices() == {key: "onednn"}
