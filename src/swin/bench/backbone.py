"""Side-by-side speed of this project's Swin backbone against timm's and torchvision's (``python -m swin.bench``).

All models of a case live in one process and are timed in alternating runs (A B C, C B A, ...); the reported
img/s is the median over repeats and each ratio is the median of the per-repeat ratios, so load drifting on a
shared machine moves all models alike. Cases: inference and training step (forward, backward, AdamW step), fp32
and bf16 autocast, eager and ``torch.compile``; plus peak memory, a resolution sweep (time per pixel) and a GEMM
roofline. Writes ``bench.json`` and ``bench.png`` into ``--out``. Peers are optional: a peer that cannot be
imported is skipped with a note (timm is only a test dependency of this package). The opt-in peers ``ours-ort`` and
``torchvision-ort`` are ours and torchvision's exported to ONNX and run under onnxruntime, in the CPU fp32 eager
inference case only. The opt-in peers ``ours-onednn`` and ``ours-aten`` are ours with every linear layer forced
onto one kernel path: ``ours`` times both per layer shape and keeps the faster (:mod:`swin.models.ops`).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the steady state (weights, optimizer state). On CPU the
peak resident set size above the steady state, read from ``/proc/self/status`` (VmHWM, reset through
``/proc/self/clear_refs``) in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor
buffer is mapped and returned to the system when freed: the resident size then follows the live tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swin.bench.common import (
    CLOCKS,
    cpu_name,
    load_average,
    machine,
    machine_line,
    memory_child,
    section,
    sync,
    time_alternating,
    top_ops,
)
from swin import models as project_models
from swin.models import VARIANTS, VARIANTS_V2, count_flops, ops

# Extra architectures for quick runs and tests (not published variants).
BENCH_VARIANTS: dict[str, dict] = {
    "micro": dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path_rate=0.1),
    "micro_v2": dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path_rate=0.1, v2=True),
}
OURS = "ours"
PEERS = ("timm", "torchvision")
BASELINE = "baseline"  # this project's backbone from another checkout (--baseline)
_baseline_source: str | None = None
TIMM_SDPA = "timm-sdpa"  # timm with its experimental fused attention switched on (not its default)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def architecture(variant: str) -> dict:
    """embed_dim, depths, num_heads, window_size, drop_path_rate and ``v2`` (Swin V2 or V1) of a variant name."""
    known = {**VARIANTS, **{name: {**arch, "v2": True} for name, arch in VARIANTS_V2.items()}, **BENCH_VARIANTS}
    arch = known.get(variant.lower())
    if arch is None:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(known)}")
    return {"window_size": 7, "v2": False, **arch}


def _project_model(models, arch: dict, **kwargs) -> nn.Module:
    """This project's V1 or V2 model of ``arch`` from a ``swin.models`` package (ours, or a baseline's copy)."""
    arch = dict(arch)
    model = models.SwinTransformerV2 if arch.pop("v2") else models.SwinTransformer
    return model(**arch, num_classes=1000, **kwargs)


def _build_ours(arch: dict, img_size: int, grad_checkpointing: bool = False) -> nn.Module:
    return _project_model(project_models, arch, grad_checkpointing=grad_checkpointing)


def _build_timm(arch: dict, img_size: int, fused_attn: bool = False) -> nn.Module:
    """timm's SwinTransformer, or its SwinTransformerV2 (as ``swinv2_tiny_window8_256`` for swinv2_t at 256²)."""
    if arch["v2"]:
        swin = importlib.import_module("timm.models.swin_transformer_v2")
        build = swin.SwinTransformerV2
    else:
        swin = importlib.import_module("timm.models.swin_transformer")
        build = swin.SwinTransformer
    model = build(
        img_size=img_size,
        patch_size=4,
        embed_dim=arch["embed_dim"],
        depths=arch["depths"],
        num_heads=arch["num_heads"],
        window_size=arch["window_size"],
        drop_path_rate=arch["drop_path_rate"],
        num_classes=1000,
    )
    if fused_attn:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
    return model


def _build_torchvision(arch: dict, img_size: int) -> nn.Module:
    """torchvision's SwinTransformer, with its V2 block and patch merging for V2 (as ``swin_v2_t`` for swinv2_t)."""
    swin = importlib.import_module("torchvision.models.swin_transformer")
    v2 = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if arch["v2"] else {}
    return swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]),
        window_size=[arch["window_size"]] * 2,
        stochastic_depth_prob=arch["drop_path_rate"],
        num_classes=1000,
        **v2,
    )


class OrtModel(nn.Module):
    """An eager model exported to ONNX (:func:`swin.export.export_onnx`: dynamic batch, ``img_size``²) and run
    under onnxruntime's CPU provider with torch's thread count; images in, logits out (fp32 inference only)."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        import onnxruntime as ort

        from swin.export import export_onnx

        path = Path(tempfile.mkdtemp(prefix="swin-bench-ort-")) / "model.onnx"
        export_onnx(model.eval(), torch.randn(2, 3, img_size, img_size), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


class ForcedKernels(nn.Module):
    """Our model with its linear layers on one kernel path (:func:`swin.models.ops.use_kernels`): the two sides of
    the timed choice that ``ours`` makes for the whole model on this machine."""

    def __init__(self, model: nn.Module, kernels: str):
        super().__init__()
        self.model, self.kernels = model, kernels

    def forward(self, x: Tensor) -> Tensor:
        with ops.use_kernels(self.kernels):
            return self.model(x)


# opt-in peers: ours with every linear layer forced onto oneDNN or onto ATen (``ours`` times both and takes one)
KERNEL_PEERS = {"ours-onednn": "onednn", "ours-aten": "aten"}

# onnxruntime rows: opt-in peers (each export takes minutes for Swin-T), timed in the infer fp32 eager CPU case only
ORT_PEERS = {"ours-ort": _build_ours, "torchvision-ort": _build_torchvision}


def _ort_only_where_it_runs(names: Sequence[str], mode: str, precision: str, compiled: bool, device: torch.device):
    """``names`` without the onnxruntime peers unless the case is CPU fp32 eager inference."""
    runs = (mode, precision, compiled, device.type) == ("infer", "fp32", False, "cpu")
    return [name for name in names if runs or name not in ORT_PEERS]


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    OURS: _build_ours,
    "timm": _build_timm,
    TIMM_SDPA: lambda arch, img_size: _build_timm(arch, img_size, fused_attn=True),
    "torchvision": _build_torchvision,
    **{name: functools.partial(lambda b, arch, img_size: OrtModel(b(arch, img_size), img_size), b)
       for name, b in ORT_PEERS.items()},
    **{name: functools.partial(lambda k, arch, img_size: ForcedKernels(_build_ours(arch, img_size), k), k)
       for name, k in KERNEL_PEERS.items()},
}  # fmt: skip


def load_baseline(path: str | os.PathLike) -> None:
    """Register ``BUILDERS["baseline"]``: the backbone of another checkout of this project (its root, its ``src``
    folder or its ``swin`` package), imported as a renamed copy (``swin_baseline``) so that both live in one process
    and are timed side by side; its custom ops move to the ``swin_baseline::`` namespace."""
    root = Path(path)
    package = next((p for p in (root / "src" / "swin", root / "swin", root) if (p / "models").is_dir()), None)
    if package is None:
        raise FileNotFoundError(f"--baseline {path}: no swin package with a models/ folder there (or in src/)")
    copy = Path(tempfile.mkdtemp(prefix="swin-baseline-")) / "swin_baseline"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for file in copy.rglob("*.py"):
        text = re.sub(r"\bswin\.", "swin_baseline.", file.read_text()).replace('"swin::', '"swin_baseline::')
        file.write_text(text)
    sys.path.insert(0, str(copy.parent))
    models = importlib.import_module("swin_baseline.models")
    global _baseline_source
    _baseline_source = str(path)
    BUILDERS[BASELINE] = lambda arch, img_size: _project_model(models, arch)


def available_models(peers: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our model plus the importable peers, and a note for each peer skipped."""
    names, notes = [OURS], []
    for peer in peers:
        if peer not in BUILDERS or peer == OURS:
            raise ValueError(f"unknown peer {peer!r}; choose from {sorted(set(BUILDERS) - {OURS})}")
        module = {
            BASELINE: "swin_baseline", **dict.fromkeys(ORT_PEERS, "onnxruntime"), **dict.fromkeys(KERNEL_PEERS, "swin")
        }.get(
            peer, "timm" if peer.startswith("timm") else peer
        )
        try:
            importlib.import_module(module)
        except ImportError as err:
            notes.append(f"{peer} skipped: {module} cannot be imported ({err})")
            continue
        names.append(peer)
    return names, notes


# ---------------------------------------------------------------------------------------------------------------
# Steps and timing
# ---------------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")


def make_step(model: nn.Module, mode: str, precision: str, x: Tensor, target: Tensor) -> Callable[[], None]:
    """One inference forward, or one training step (forward, cross-entropy, backward, fused AdamW step)."""
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), _autocast(x.device, precision):
                model(x)

        return infer
    if mode != "train":
        raise ValueError(f"unknown mode {mode!r}; choose infer or train")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the tasks train, for every model

    def train() -> None:
        with _autocast(x.device, precision):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def _inputs(batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    return x, torch.randint(0, 1000, (batch,), generator=generator).to(device)


def run_case(
    names: list[str], arch: dict, mode: str, precision: str, compiled: bool, batch: int, size: int,
    device: torch.device, repeats: int, min_time: float, clock: str = "wall",
) -> dict:
    """Time every model on one case; img/s medians and paired ratios of ours to each peer (>1: ours faster)."""
    names = _ort_only_where_it_runs(names, mode, precision, compiled, device)
    x, target = _inputs(batch, size, device)
    load_before = load_average()
    steps = {}
    for name in names:
        torch.manual_seed(0)
        model = BUILDERS[name](arch, size).to(device)
        steps[name] = make_step(torch.compile(model) if compiled else model, mode, precision, x, target)
    times = time_alternating(steps, device, repeats, min_time, clock)
    result = {
        "mode": mode, "precision": precision, "compiled": compiled, "batch": batch, "size": size,
        "load": [load_before, load_average()],
        "models": {name: {"sec": t, "img_s": batch / statistics.median(t)} for name, t in times.items()},
        "ratio": {
            name: statistics.median(p / o for p, o in zip(times[name], times[OURS])) for name in names if name != OURS
        },
    }
    with torch.device("meta"):
        macs = count_flops(_project_model(project_models, arch), size)
    flops = 2 * macs * (3 if mode == "train" else 1)  # a training step: forward + twice its cost backward
    result["models"][OURS]["gflop_s"] = flops * result["models"][OURS]["img_s"] / 1e9
    return result


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one call above the state before it (run the step once before, so it is steady)."""
    step()
    sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    step()
    return max(0.0, (_rss_kib("VmHWM") - before) / 2**10)  # the kernel may reclaim pages meanwhile: never < 0


def memory_table(
    names: list[str], arch: dict, modes: Sequence[str], precisions: Sequence[str], batch: int, size: int,
    device: torch.device,
) -> list[dict]:
    """Peak memory per model, mode and precision (eager); ours also with gradient checkpointing when training."""
    x, target = _inputs(batch, size, device)
    rows = []
    for mode in modes:
        for precision in precisions:
            variants = [(name, False) for name in names] + ([(OURS, True)] if mode == "train" else [])
            for name, ckpt in variants:
                torch.manual_seed(0)
                model = (_build_ours(arch, size, ckpt) if name == OURS else BUILDERS[name](arch, size)).to(device)
                mb = peak_memory_mb(make_step(model, mode, precision, x, target), device)
                label = f"{name}+checkpointing" if ckpt else name
                rows.append({"mode": mode, "precision": precision, "model": label, "peak_mb": mb})
                del model
    return rows


def _memory_child() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.pop("threads"))
    if spec.get("baseline"):
        load_baseline(spec["baseline"])
    del spec["baseline"]
    spec["arch"]["depths"], spec["arch"]["num_heads"] = tuple(spec["arch"]["depths"]), tuple(spec["arch"]["num_heads"])
    print(json.dumps(memory_table(**spec, device=torch.device("cpu"))))


def memory_cpu(names: list[str], arch: dict, modes, precisions, batch: int, size: int) -> list[dict]:
    """:func:`memory_table` in a child process whose allocator returns every freed tensor buffer to the system."""
    spec = dict(names=names, arch=arch, modes=list(modes), precisions=list(precisions), batch=batch, size=size)
    spec["threads"] = torch.get_num_threads()
    spec["baseline"] = _baseline_source
    return memory_child("swin.bench.backbone", spec)


# ---------------------------------------------------------------------------------------------------------------
# Resolution sweep and roofline
# ---------------------------------------------------------------------------------------------------------------


def sweep(
    names: list[str], arch: dict, sizes: Sequence[int], precision: str, batch: int, device: torch.device,
    repeats: int, min_time: float, clock: str = "wall",
) -> list[dict]:
    """Inference time per pixel at each size (eager), every model and size alternating in one timing loop.

    ``per_pixel_vs_first`` is the time per pixel relative to the first size: 1 for a cost linear in pixels.
    """
    steps, load_before = {}, load_average()
    for name in names:
        model = None
        for size in sizes:
            if model is None or name != OURS:  # timm builds its masks for one input size
                torch.manual_seed(0)
                model = BUILDERS[name](arch, size).to(device)
            x, target = _inputs(batch, size, device)
            steps[(name, size)] = make_step(model, "infer", precision, x, target)
    times = time_alternating(steps, device, repeats, min_time, clock)
    load = [load_before, load_average()]
    rows = [
        {
            "model": name, "size": size, "precision": precision, "load": load,
            "ns_per_pixel": 1e9 * statistics.median(t) / (batch * size * size),
            "per_pixel_vs_first": statistics.median(
                a / b * sizes[0] ** 2 / size**2 for a, b in zip(t, times[(name, sizes[0])])
            ),
        }
        for (name, size), t in times.items()
    ]
    return rows


def profile_ops(
    names: list[str], arch: dict, mode: str, precision: str, batch: int, size: int, device: torch.device, top: int = 10
) -> dict[str, list[dict]]:
    """torch.profiler's top operators by self time, per model, over two steps (after a warm-up step)."""
    x, target = _inputs(batch, size, device)
    tables = {}
    for name in names:
        torch.manual_seed(0)
        step = make_step(BUILDERS[name](arch, size).to(device), mode, precision, x, target)
        step()
        sync(device)
        tables[name] = top_ops(step, device, top, steps=2)
    return tables


def gemm_roofline(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best GFLOP/s of an n×n×n matmul (the default BLAS and, on CPU, oneDNN)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    kernels = [lambda: a @ b]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for kernel in kernels:
        kernel()
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            kernel()
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def case_label(case: dict) -> str:
    return f"{case['mode']} {case['precision']}{' compiled' if case['compiled'] else ''}"


def plot(report: dict, path: Path) -> None:
    """Bar chart of img/s per case and model; time per pixel against resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, names = report["cases"], report["models"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [c["models"].get(name, {}).get("img_s", 0.0) for c in cases]
        axes[0].bar([j + i * width for j in range(len(cases))], values, width, label=name)
    axes[0].set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cases))])
    axes[0].set_xticklabels([case_label(c) for c in cases], rotation=20, ha="right")
    axes[0].set_ylabel("images / s")
    axes[0].set_title(f"{report['variant']}, batch {report['batch']}, {report['size']}², {report['device_name']}")
    axes[0].legend()
    for name in names:
        rows = [r for r in report["sweep"] if r["model"] == name]
        if rows:
            axes[1].plot([r["size"] for r in rows], [r["ns_per_pixel"] for r in rows], marker="o", label=name)
    axes[1].set_xlabel("image side (px)")
    axes[1].set_ylabel("inference ns / pixel")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("time per pixel (flat = linear cost)")
    if report["sweep"]:  # --sizes none: no lines to name
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The report's tables in Markdown: speed per case, peak memory, time per pixel."""
    names, peers = report["models"], [n for n in report["models"] if n != OURS]
    lines = [
        f"`{report['command']}` — {report['variant']}, batch {report['batch']}, {report['size']}², "
        f"{report['device_name']}, {report['threads']} threads, torch {report['torch']}, {report['clock']} clock",
        "",
        f"Machine: {machine_line(report['machine'])}",
        "",
        "| case | " + " | ".join(f"{n} img/s" for n in names) + " | " + " | ".join(f"ours ÷ {p}" for p in peers)
        + " | ours GFLOP/s | load (1 min) |",
        "|---" * (len(names) + len(peers) + 3) + "|",
    ]
    for c in report["cases"]:
        speeds = " | ".join(f"{c['models'][n]['img_s']:.1f}" if n in c["models"] else "" for n in names)
        ratios = " | ".join(f"×{c['ratio'][p]:.2f}" if p in c["ratio"] else "" for p in peers)
        load = "–".join(f"{v:.1f}" for v in c["load"] if v is not None)
        lines.append(f"| {case_label(c)} | {speeds} | {ratios} | {c['models'][OURS]['gflop_s']:.0f} | {load} |")
    if report["memory"]:
        lines += ["", "| peak memory above the steady state (weights, optimizer) | model | MB |", "|---|---|---|"]
        for r in report["memory"]:
            mb = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            lines.append(f"| {r['mode']} {r['precision']} | {r['model']} | {mb} |")
    if report["sweep"]:
        sizes = sorted({r["size"] for r in report["sweep"]})
        lines += ["", "| ns / pixel (÷ first size) | " + " | ".join(f"{s}²" for s in sizes) + " |"]
        lines.append("|---" * (len(sizes) + 1) + "|")
        for name in names:
            rows = {r["size"]: r for r in report["sweep"] if r["model"] == name}
            cells = " | ".join(
                f"{rows[s]['ns_per_pixel']:.1f} (×{rows[s]['per_pixel_vs_first']:.2f})" if s in rows else "" for s in sizes
            )
            lines.append(f"| {name} | {cells} |")
    for name, rows in report.get("profile", {}).items():
        lines += ["", f"| {name}: top ops ({report['profile_case']}) | ms / step | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |" for r in rows]
    lines += [f"\n**{e}**" for e in report["errors"]]
    lines += ["", "GEMM roofline: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in report["roofline_gflop_s"].items())]
    return "\n".join(lines) + "\n"


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant", default="swin_t", help="swin_t, swin_s, swin_b, swin_l, swinv2_t, ..., swinv2_l, micro or micro_v2"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="side of the square input of the main cases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", type=_csv, default=["infer", "train"], help="infer,train")
    parser.add_argument("--precisions", type=_csv, default=None, help="fp32,bf16 (CUDA default: bf16)")
    parser.add_argument(
        "--compile", type=_csv, nargs="?", const=["infer"], default=[],
        help="also time torch.compile for these modes (flag alone: infer)",
    )
    parser.add_argument("--sizes", type=_csv, default=None, help="sweep sides, e.g. 224,448,672,896; 'none' skips")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timed sample (default 1; quick 0)")
    parser.add_argument("--peers", type=_csv, default=list(PEERS), help=f"from {sorted(set(BUILDERS) - {OURS})}")
    parser.add_argument(
        "--baseline", type=Path, default=None,
        help="also time this project's backbone from another checkout (a folder), e.g. a worktree of an older commit",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall time, or process CPU time (robust on a busy machine with --threads 1)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops per model (first mode)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json, .md and .png")
    parser.add_argument("--quick", action="store_true", help="2 repeats, short samples, sweep of 2 sizes")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    args.precisions = args.precisions or (["bf16"] if cuda else ["fp32", "bf16"])
    if args.sizes is None:
        args.sizes = [args.image_size, 2 * args.image_size] if args.quick else [224, 448, 672, 896]
    args.sizes = [] if args.sizes == ["none"] else [int(s) for s in args.sizes]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else (0.5 if cuda else 1.0)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch = architecture(args.variant)
    if args.baseline is not None:
        load_baseline(args.baseline)
        args.peers = [*args.peers, BASELINE]
    names, notes = available_models(args.peers)
    for note in notes:
        print(note, file=sys.stderr)
    report = {
        "variant": args.variant, "batch": args.batch_size, "size": args.image_size, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "models": names, "notes": notes,
        "timm_fused_attn_env": os.environ.get("TIMM_FUSED_ATTN"), "repeats": args.repeats, "clock": args.clock,
        "command": "python -m swin.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "roofline_gflop_s": {}, "cases": [], "memory": [], "sweep": [], "errors": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))

    def roofline() -> None:
        for p in args.precisions:
            report["roofline_gflop_s"][p] = gemm_roofline(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[p])

    def case(mode: str, precision: str, compiled: bool) -> None:
        result = run_case(
            names, arch, mode, precision, compiled, args.batch_size, args.image_size, device, args.repeats,
            args.min_time, args.clock,
        )
        report["cases"].append(result)
        ratios = ", ".join(f"{k} ×{v:.2f}" for k, v in result["ratio"].items())
        speeds = ", ".join(f"{k} {m['img_s']:.1f}" for k, m in result["models"].items())
        print(f"{case_label(result):>22}: {speeds} img/s | ours vs {ratios} | load {result['load']}", flush=True)

    eager = [name for name in names if name not in ORT_PEERS]  # memory, profile and sweep: the eager models

    def memory() -> None:
        spec = (eager, arch, args.modes, args.precisions, args.batch_size, args.image_size)
        report["memory"] = memory_table(*spec, device) if device.type == "cuda" else memory_cpu(*spec)

    def profile() -> None:
        mode, precision = args.modes[0], args.precisions[0]
        report["profile_case"] = f"{mode} {precision}"
        report["profile"] = profile_ops(eager, arch, mode, precision, args.batch_size, args.image_size, device)

    def resolution_sweep() -> None:
        report["sweep"] = sweep(
            eager, arch, args.sizes, args.precisions[0], args.batch_size, device, args.repeats, args.min_time,
            args.clock,
        )

    section(report, "roofline", roofline, save)
    for mode in args.modes:
        for precision in args.precisions:
            for compiled in (False, True) if mode in args.compile else (False,):
                label = case_label({"mode": mode, "precision": precision, "compiled": compiled})
                section(report, label, functools.partial(case, mode, precision, compiled), save)
    if not args.no_memory:
        section(report, "memory", memory, save)
    if args.profile:
        section(report, "profile", profile, save)
    if args.sizes:
        section(report, "sweep", resolution_sweep, save)
    (args.out / "bench.md").write_text(markdown(report))
    plot(report, args.out / "bench.png")
    print(markdown(report))
    print(f"wrote bench.json, bench.md and bench.png to {args.out}")
    return report
