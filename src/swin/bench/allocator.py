"""Allocator settings against each other (``python -m swin.bench --allocator``): a training step of the backbone
(forward, cross-entropy, backward, fused AdamW) in a fresh process per setting and repeat, in alternating order.

Per setting, with and without gradient checkpointing: time per step, minor page faults per step, the kernel's share
of the process's CPU time, and memory as the OS sees it: the resident size that persists between steps (weights,
gradients, optimizer state; after ``malloc_trim``), the peak resident size of a step (``VmHWM``) and the difference;
then checkpointing's peak over the plain step's, above the persistent size and in total. Settings: glibc's defaults,
this project's ``SWIN_MALLOC=heap`` and ``SWIN_MALLOC=lean`` (:mod:`swin.allocator`), and tcmalloc and jemalloc
through ``LD_PRELOAD`` where their libraries are installed (Debian: ``libtcmalloc-minimal4``, ``libjemalloc2``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swin.bench.common import load_average, machine, machine_line

LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
MALLOPT = {"glibc": "default", "heap": "heap", "lean": "lean"}  # setting: its SWIN_MALLOC value
SETTINGS = (*MALLOPT, *LIBRARIES)


def _library(name: str) -> str | None:
    """The path of a preloadable allocator library, or None where it is not installed."""
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                   "/usr/local/lib"):  # fmt: skip
        path = Path(folder) / LIBRARIES[name]
        if path.exists():
            return str(path)
    return None


def environment(setting: str) -> dict[str, str] | None:
    """The child's environment for a setting (None: its library is not installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    if setting in LIBRARIES:
        path = _library(setting)
        if path is None:
            return None
        return {**env, "LD_PRELOAD": path}
    return {**env, "SWIN_MALLOC": MALLOPT[setting]}


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**10


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run in the child: without and then with gradient checkpointing, time ``--steps`` training steps, then measure
    one step's memory."""
    import torch
    import torch.nn.functional as F

    from swin import allocator
    from swin.bench.backbone import _build_ours, architecture

    in_force = allocator.tune_malloc()
    arch = architecture(args.variant)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    target = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    row: dict[str, Any] = {"allocator": in_force}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _build_ours(arch, args.image_size, grad_checkpointing=checkpointing).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            F.cross_entropy(model(x), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        allocator.trim()
        persistent = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
        step()
        key = "checkpointing_" if checkpointing else ""
        row |= {
            f"{key}sec": statistics.median(times),
            f"{key}minor_faults": (after.ru_minflt - before.ru_minflt) / args.steps,
            f"{key}sys_share": (after.ru_stime - before.ru_stime) / max(cpu, 1e-9),
            f"{key}persistent_mb": persistent,
            f"{key}peak_mb": _status_mb("VmHWM"),
            f"{key}peak_above_mb": _status_mb("VmHWM") - persistent,
        }
    return row


def _speed(row: dict[str, Any], glibc: dict[str, Any] | None, key: str) -> str:
    return f"×{glibc[key] / row[key]:.2f}" if glibc else ""


def _ratio(row: dict[str, Any], key: str) -> str:
    """Checkpointing's ``key`` over the plain step's; "-" where the plain step's peak hardly rose above the persistent
    size (an allocator that keeps its peak: nothing to compare)."""
    return f"{row['checkpointing_' + key] / row[key]:.2f}×" if row["peak_above_mb"] >= 10 else "-"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Command: `{report['command']}`", "",
        f"Machine: {machine_line(report['machine'])}; Swin {report['variant']}, batch {report['batch_size']}, "
        f"{report['image_size']}², fp32; medians over {report['repeats']} processes per setting (alternating order)",
        "", "| setting | in force | s / step | vs glibc | minor faults / step | kernel share | persistent MB | "
        "peak MB | peak above MB | checkpointing: s / step | vs glibc | minor faults / step | peak MB | peak above MB "
        "| checkpointing ÷ plain: above | total |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    glibc = report["summary"].get("glibc")
    for name, row in report["summary"].items():
        lines.append(
            f"| {name} | {row['allocator']} | {row['sec']:.3f} | {_speed(row, glibc, 'sec')} | "
            f"{row['minor_faults']:,.0f} | {100 * row['sys_share']:.1f} % | {row['persistent_mb']:.0f} | "
            f"{row['peak_mb']:.0f} | {row['peak_above_mb']:.0f} | {row['checkpointing_sec']:.3f} | "
            f"{_speed(row, glibc, 'checkpointing_sec')} | {row['checkpointing_minor_faults']:,.0f} | "
            f"{row['checkpointing_peak_mb']:.0f} | {row['checkpointing_peak_above_mb']:.0f} | "
            f"{_ratio(row, 'peak_above_mb')} | {_ratio(row, 'peak_mb')} |"
        )
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench --allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="swin_t")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting")
    parser.add_argument("--settings", type=lambda v: v.split(","), default=list(SETTINGS), help=f"from {SETTINGS}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-allocator"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {SETTINGS}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    report: dict[str, Any] = {
        "command": "python -m swin.bench --allocator " + " ".join(argv), "machine": machine(),
        "variant": args.variant, "batch_size": args.batch_size, "image_size": args.image_size,
        "repeats": args.repeats, "runs": {}, "notes": [], "errors": [], "load": [load_average()],
    }  # fmt: skip
    settings = []
    for name in args.settings:
        if environment(name) is None:
            report["notes"].append(f"{name} skipped: {LIBRARIES[name]} is not installed")
        else:
            settings.append(name)
    for r in range(args.repeats):
        for name in settings if r % 2 == 0 else settings[::-1]:
            proc = subprocess.run([sys.executable, "-m", "swin.bench", "--allocator", *argv, "--worker", name],
                                  env=environment(name), capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                report["errors"].append(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
                print(report["errors"][-1], file=sys.stderr)
                continue
            report["runs"].setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report["load"].append(load_average())
    report["summary"] = {
        name: {key: (statistics.median(r[key] for r in runs) if key != "allocator" else runs[0][key]) for key in runs[0]}
        for name, runs in report["runs"].items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocator.json").write_text(json.dumps(report, indent=1))
    (args.out / "allocator.md").write_text(markdown(report))
    print(markdown(report))
    return report
