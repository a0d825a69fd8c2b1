"""What every benchmark mode shares: alternating timed runs and a description of the machine they ran on."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# CPU flags that decide which kernels pay off (oneDNN's AVX-512 / AMX paths, bf16 support).
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse ``type``: a comma-separated list of names from ``choices``; an unknown name is an error naming it."""

    def parse(value: str) -> list[str]:
        names = [v for v in value.split(",") if v]
        if unknown := sorted(set(names) - set(choices)):
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return names

    return parse


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int, min_time: float, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of each step: warm-up (compiles), then ``repeats`` rounds alternating the order.

    ``clock="cpu"`` counts the process's CPU time instead of wall time: with one thread on a shared machine it
    leaves out the time other processes hold the core.
    """
    now = CLOCKS[clock]
    iters = {}
    for name, step in steps.items():
        step()
        sync(device)
        start = now()
        step()
        sync(device)
        iters[name] = max(1, math.ceil(min_time / max(now() - start, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            start = now()
            for _ in range(iters[name]):
                steps[name]()
            sync(device)
            times[name].append((now() - start) / iters[name])
    return times


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if k.strip()}


def cpu_name() -> str:
    """Model name and core count, e.g. ``AMD EPYC 9R14 (2 cores)``."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def machine() -> dict:
    """The CPU a figure was taken on: vendor, family / model, the flags that matter and torch's kernel level."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": cpu_name(), "vendor": info.get("vendor_id", platform.machine()),
        "family": info.get("cpu family"), "model": info.get("model"),
        "flags": [f for f in FLAGS_THAT_MATTER if f in flags],
        "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "torch": torch.__version__,
    }


def machine_line(m: dict) -> str:
    """One line for a table's caption."""
    return (f"{m['cpu']}, {m['vendor']} family {m['family']} model {m['model']}, torch capability "
            f"{m['capability']}, flags {' '.join(m['flags']) or '-'}")


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def section(report: dict, label: str, run: Callable[[], None], save: Callable[[], None]) -> None:
    """Run one part of the benchmark; a failure (e.g. out of memory) is reported and the other parts still run."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 - keep what the other parts measured
        message = f"{label} failed: {type(err).__name__}: {err}"
        print(message, file=sys.stderr, flush=True)
        report["errors"].append(message)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save()


def top_ops(step: Callable[[], object], device: torch.device, top: int = 12, steps: int = 1) -> list[dict]:
    """torch.profiler's top operators by self time, per step, over ``steps`` calls of a warm ``step``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    ops: dict[str, list[float]] = {}  # an op may come in several averages (e.g. overloads): one row each name
    for e in prof.key_averages():
        us, count = ops.setdefault(e.key, [0.0, 0])
        ops[e.key] = [us + getattr(e, attr), count + e.count]
    total = sum(us for us, _ in ops.values())
    rows = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        {"op": op, "ms_per_step": us / 1e3 / steps, "share": us / total, "calls": count // steps}
        for op, (us, count) in rows
    ]


def memory_child(module: str, spec: dict) -> list[dict]:
    """``module._memory_child()`` in a child process given ``spec`` (JSON) as its argument, with an allocator that
    maps every tensor buffer and unmaps it when freed, so that the resident size follows the live tensors; returns
    the JSON the child prints last."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    code = f"import {module} as m; m._memory_child()"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
