"""The paper's Table 5 on this machine (``python -m swin.bench --attention``): three ways to compute the attention of
a shifted-window block, per stage of a Swin variant, timed forward (``torch.inference_mode``) in alternating runs.

- **ours**: cyclic shift + masking, the block's own code (:class:`~swin.models.swin.WindowBlock`'s padding to a
  window multiple and token gathers around :class:`~swin.models.swin.WindowAttention`, shift mask included);
- **padding**: the naive batch computation: the map (already padded to a window multiple, as the block pads it) is
  padded further so that the shifted partition has only full windows, (⌈H/M⌉+1)×(⌈W/M⌉+1) of them, and the added
  tokens are masked as keys; the same windows as ours, so the same numbers, on more windows;
- **sliding**: sliding-window attention: every query attends to the M×M neighbourhood centred on it (keys and
  values gathered per query, keys outside the map masked), with the same relative position bias.

Each variant is the same attention part: the qkv projection, attention with the relative position bias, the output
projection and whatever rearranging of tokens the method needs; all three run on the whole map at once
(``piece_tokens=0``), with the same :class:`~swin.models.swin.WindowAttention` weights, and with its masks and
biases built once per shape (ours caches its bias and mask the same way). Where the padded map fits in one window
in a dimension the block does not shift there, and nor does the padding variant.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from swin.bench.backbone import architecture
from swin.bench.common import CLOCKS, load_average, machine, machine_line, section, time_alternating
from swin.models.swin import MASK_VALUE, WindowAttention, WindowBlock, window_geometry, window_partition, window_reverse

METHODS = ("ours", "padding", "sliding")


class CyclicShiftAttention(WindowBlock):
    """Ours: a shifted block's window machinery (pad, cyclic shift + partition as one gather, shift mask, back)
    around ``attn``, with nothing else of the block (no norms, residuals or MLP)."""

    def __init__(self, attn: WindowAttention):
        super().__init__()
        self.attn = attn
        self.window_size = attn.window_size
        self.shifted = True
        self.piece_tokens = 0  # the whole map at once, as the other two methods

    def windows_forward(
        self, tokens: Tensor, positions: slice, window: int, mask: Tensor | None, valid: Tensor | None
    ) -> Tensor:
        """Attention of the windows at ``positions`` (padding tokens are the zeros the block padded with)."""
        b, length, c = tokens.shape
        n = window**2
        windows = slice(positions.start // n, positions.stop // n)
        return self.attn(tokens.reshape(-1, n, c), mask, windows).view(b, length, c)


# ---------------------------------------------------------------------------------------------------------------
# Padding the shifted windows
# ---------------------------------------------------------------------------------------------------------------


def padded_geometry(height: int, width: int, window: int) -> tuple[int, int, int, int]:
    """Top, bottom, left and right padding of an H×W map so that the shifted partition has full windows.

    The bottom / right padding includes the block's own padding to a window multiple (whose zeros are tokens, as in
    the block); the shift s moves the window boundaries to s + kM, hence M - s rows on top and s more at the bottom.
    """
    pad_h, pad_w, (shift_h, shift_w) = window_geometry(height, width, window, True)
    top, left = (window - shift_h) % window, (window - shift_w) % window
    return top, pad_h - height + shift_h, left, pad_w - width + shift_w


@functools.lru_cache(maxsize=32)
def padding_mask(height: int, width: int, window: int, device: torch.device) -> Tensor:
    """(nW, N, N) additive mask of the padded map: MASK_VALUE at the keys the shift padding added, else 0."""
    top, bottom, left, right = padded_geometry(height, width, window)
    pad_h, pad_w, _ = window_geometry(height, width, window, True)
    keep = torch.zeros(height + top + bottom, width + left + right, dtype=torch.bool)
    keep[top : top + pad_h, left : left + pad_w] = True  # the map and the block's zeros
    keys = window_partition(keep[None, :, :, None], window).squeeze(-1)  # (nW, N)
    mask = torch.where(keys, 0.0, MASK_VALUE)[:, None, :].expand(-1, window * window, -1)
    return mask.contiguous().to(device)


def padded_attention(attn: WindowAttention, x: Tensor) -> Tensor:
    """Shifted-window attention of (B, H, W, C) by padding the shifted windows: pad, partition, attend with the
    added keys masked, reverse, crop."""
    b, h, w, c = x.shape
    m = attn.window_size
    top, bottom, left, right = padded_geometry(h, w, m)
    x = F.pad(x, (0, 0, left, right, top, bottom))
    mask = padding_mask(h, w, m, x.device)
    out = window_reverse(attn(window_partition(x, m), mask), m, x.shape[1], x.shape[2])
    return out[:, top : top + h, left : left + w]


# ---------------------------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------------------------


def _offsets(window: int) -> Tensor:
    """Offsets of an M-wide neighbourhood around its centre: -(M//2) .. M-1-M//2."""
    return torch.arange(window) - window // 2


@functools.lru_cache(maxsize=32)
def neighbourhood(height: int, width: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat index (H·W·M²) of every query's M×M neighbours in the map zero-padded by the neighbourhood's reach, and
    a (H·W, M²) bool that is False where the neighbour lies outside the map."""
    lo, hi = window // 2, window - 1 - window // 2
    rows = torch.arange(height)[:, None] + _offsets(window)[None, :]  # (H, M)
    cols = torch.arange(width)[:, None] + _offsets(window)[None, :]  # (W, M)
    padded_w = width + lo + hi
    index = (rows + lo)[:, None, :, None] * padded_w + (cols + lo)[None, :, None, :]  # (H, W, M, M)
    inside = ((rows >= 0) & (rows < height))[:, None, :, None] & ((cols >= 0) & (cols < width))[None, :, None, :]
    return index.flatten().to(device), inside.reshape(height * width, window * window).to(device)


def sliding_bias(attn: WindowAttention, height: int, width: int) -> Tensor:
    """(H·W, nH, 1, M²) additive bias of sliding-window attention: the relative position bias of each neighbour
    offset (the same table as the windows) plus MASK_VALUE at neighbours outside the map."""
    m = attn.window_size
    table = attn.relative_position_bias_table
    offsets = _offsets(m).to(table.device)
    # query minus key is -offset in each dimension; the table's index of a relative position (dy, dx)
    rel = (-offsets + m - 1)[:, None] * (2 * m - 1) + (-offsets + m - 1)[None, :]
    bias = table[rel.flatten()].t()  # (nH, M²)
    _, inside = neighbourhood(height, width, m, table.device)
    mask = torch.where(inside, 0.0, MASK_VALUE)  # (H·W, M²)
    return (bias[None, :, None, :] + mask[:, None, None, :]).contiguous()


def sliding_attention(attn: WindowAttention, x: Tensor, bias: Tensor) -> Tensor:
    """Sliding-window attention of (B, H, W, C) with ``attn``'s weights and :func:`sliding_bias`'s ``bias``."""
    b, h, w, c = x.shape
    m, heads, hd = attn.window_size, attn.num_heads, attn.head_dim
    lo, hi = m // 2, m - 1 - m // 2
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    q = qkv[..., :c].reshape(b * h * w, 1, heads, hd).transpose(1, 2)  # (B·L, nH, 1, hd)
    kv = F.pad(qkv[..., c:], (0, 0, lo, hi, lo, hi)).flatten(1, 2)  # (B, H'·W', 2C)
    index, _ = neighbourhood(h, w, m, x.device)
    kv = kv.index_select(1, index).view(b * h * w, m * m, 2, heads, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B·L, nH, M², hd)
    if b > 1:
        bias = bias.expand(b, -1, -1, -1, -1).reshape(b * h * w, *bias.shape[1:])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B·L, nH, 1, hd)
    return attn.proj(out.reshape(b, h, w, c))


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------


def stage_shapes(arch: dict, height: int, width: int, patch: int = 4) -> list[dict]:
    """Map size, channels and heads of each stage for an H×W image (ceil semantics, as the backbone pads)."""
    h, w = -(-height // patch), -(-width // patch)
    shapes = []
    for i, heads in enumerate(arch["num_heads"]):
        shapes.append({"stage": i + 1, "height": h, "width": w, "dim": arch["embed_dim"] * 2**i, "heads": heads})
        h, w = -(-h // 2), -(-w // 2)
    return shapes


def steps_for(shape: dict, window: int, batch: int) -> tuple[dict[str, Callable[[], None]], dict[str, Tensor]]:
    """One inference call of each method on a stage's map, and each method's output (for a sanity check)."""
    torch.manual_seed(0)
    attn = WindowAttention(shape["dim"], window, shape["heads"]).eval()
    ours, padded = CyclicShiftAttention(attn).eval(), copy.deepcopy(attn)  # each its own bias cache
    x = torch.randn(batch, shape["height"], shape["width"], shape["dim"])
    with torch.inference_mode():
        bias = sliding_bias(attn, shape["height"], shape["width"])
    calls = {"ours": lambda: ours(x), "padding": lambda: padded_attention(padded, x),
             "sliding": lambda: sliding_attention(attn, x, bias)}  # fmt: skip

    def timed(call: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                call()

        return step

    with torch.inference_mode():
        outputs = {name: call() for name, call in calls.items()}
    return {name: timed(call) for name, call in calls.items()}, outputs


def run_size(
    arch: dict, height: int, width: int, batch: int, repeats: int, min_time: float, clock: str = "wall"
) -> list[dict]:
    """Per stage: median ms of each method and the median per-repeat ratio of each to ours."""
    window = arch["window_size"]
    rows = []
    for shape in stage_shapes(arch, height, width):
        steps, outputs = steps_for(shape, window, batch)
        load = [load_average()]
        times = time_alternating(steps, torch.device("cpu"), repeats, min_time, clock)
        load.append(load_average())
        pad_h, pad_w, _ = window_geometry(shape["height"], shape["width"], window, True)
        rows.append({
            **shape, "size": [height, width], "batch": batch, "load": load,
            "windows": {"ours": pad_h * pad_w // window**2,
                        "padding": padding_mask(shape["height"], shape["width"], window, torch.device("cpu")).shape[0]},
            "padding_max_diff": (outputs["padding"] - outputs["ours"]).abs().max().item(),
            "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
            "ratio": {name: statistics.median(a / o for a, o in zip(times[name], times["ours"]))
                      for name in METHODS[1:]},
        })  # fmt: skip
        print(
            f"{height}×{width} stage {shape['stage']}: "
            + ", ".join(f"{n} {rows[-1]['ms'][n]:.2f} ms" for n in METHODS)
            + " | " + ", ".join(f"{n} ÷ ours ×{r:.2f}" for n, r in rows[-1]["ratio"].items()),
            flush=True,
        )
    return rows


def markdown(report: dict) -> str:
    """The report as one Markdown table, with the command and the machine line."""
    lines = [
        f"`{report['command']}` — {report['variant']} stages, window {report['window']}, batch {report['batch']}, "
        f"{report['threads']} threads, torch {report['torch']}, fp32 inference, {report['clock']} clock, "
        f"{report['repeats']} repeats",
        "",
        f"Machine: {machine_line(report['machine'])}",
        "",
        "| image | stage | map | C | heads | windows ours / padding | ours ms | padding ms | sliding ms "
        "| padding ÷ ours | sliding ÷ ours | load (1 min) |",
        "|---" * 12 + "|",
    ]
    for r in report["rows"]:
        load = "–".join(f"{v:.1f}" for v in r["load"] if v is not None)
        lines.append(
            f"| {r['size'][0]}×{r['size'][1]} | {r['stage']} | {r['height']}×{r['width']} | {r['dim']} | {r['heads']} "
            f"| {r['windows']['ours']} / {r['windows']['padding']} | "
            + " | ".join(f"{r['ms'][n]:.2f}" for n in METHODS)
            + " | " + " | ".join(f"×{r['ratio'][n]:.2f}" for n in METHODS[1:]) + f" | {load} |"
        )
    lines += [f"\n**{e}**" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench --attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="swin_t", help="the stage shapes of a V1 variant (swin_t, ..., micro)")
    parser.add_argument(
        "--sizes", type=lambda v: [_size(s) for s in v.split(",") if s], default=[(224, 224), (800, 1216)],
        help="image sizes, HxW or a side (default 224,800x1216)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per timed sample")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall time, or process CPU time (robust on a busy machine with --threads 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for attention.json and .md")
    args = parser.parse_args(argv)
    if architecture(args.variant).get("v2"):
        parser.error(f"--variant {args.variant}: Swin V2's attention is not this comparison's (choose a V1 variant)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = architecture(args.variant)
    report = {
        "variant": args.variant, "window": arch["window_size"], "batch": args.batch_size, "repeats": args.repeats,
        "clock": args.clock, "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": "python -m swin.bench --attention " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": [], "errors": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "attention.json").write_text(json.dumps(report, indent=1))

    for height, width in args.sizes:
        run = lambda h=height, w=width: report["rows"].extend(  # noqa: E731
            run_size(arch, h, w, args.batch_size, args.repeats, args.min_time, args.clock)
        )
        section(report, f"{height}×{width}", run, save)
    (args.out / "attention.md").write_text(markdown(report))
    print(markdown(report))
    return report
