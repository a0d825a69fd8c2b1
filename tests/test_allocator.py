"""SWIN_MALLOC: ``heap`` (the CLI's and the benchmark's default) keeps freed tensor buffers for the next step, ``lean``
(the CLI's for a training run with gradient checkpointing) hands each one back to the kernel."""

import json
import os
import subprocess
import sys

import pytest

from swin import allocator

# a fresh process: buffers of about 40 MiB (above glibc's largest mmap threshold; each a little smaller than the one
# before, as activations of varying size are) written and freed three times, then once more: the minor page faults
# of the last one are counted, and the resident memory its free hands back; then an 8 MiB buffer and a 4 MiB one,
# and what the latter's free hands back (glibc's own threshold has risen to 8 MiB by then). SWITCH runs between
# tune_malloc() and measure().
PROBE = """
import json, re, resource
from pathlib import Path
import torch
from swin.allocator import tune_malloc
def resident_mb(): return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
def written(n): return torch.empty(n).fill_(1.0)
def freed_mb(n):
    c = written(n)
    resident = resident_mb()
    del c
    return resident - resident_mb()
def measure():
    for i in range(3):
        written((10 << 20) - i * 4096)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    freed = freed_mb((10 << 20) - 3 * 4096)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    written(2 << 20)
    return {"faults": faults, "freed_mb": freed, "freed_smaller_mb": freed_mb(1 << 20)}
in_force = tune_malloc()
SWITCH
print(json.dumps({"in_force": in_force, **measure()}))
"""
# the CLI's hook before fit: the process starts on the default setting, then trains a model without and one with
# gradient checkpointing
CLI_FIT = """
from types import SimpleNamespace
from swin.cli import SwinCLI
from swin.models import build_swin
def fit(grad_checkpointing):
    model = build_swin("custom", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4,
                       num_classes=2, grad_checkpointing=grad_checkpointing)
    SwinCLI.before_fit(SimpleNamespace(model=model))
fit(False)
print(json.dumps(measure()))
fit(True)
"""
PAGES = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")


def _probe(switch: str = "", **env: str) -> list[dict]:
    """PROBE in a fresh process; its printed measurements, in order."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "SWIN_MALLOC")}
    code = PROBE.replace("SWITCH", switch)
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@glibc_only
def test_heap_setting_reuses_freed_buffers_where_glibc_faults_them_in_again():
    [heap], [default] = _probe(), _probe(SWIN_MALLOC="default")
    assert heap["in_force"] == "heap" and default["in_force"] == "default"
    assert heap["faults"] < PAGES // 20, heap  # the freed buffers' pages are reused
    assert heap["freed_mb"] < 4, heap  # and stay resident for the next step
    assert default["faults"] > PAGES // 2, default  # glibc unmapped them: every page faulted in again
    assert default["freed_smaller_mb"] < 1, default  # but kept a buffer below its risen threshold


@glibc_only
def test_lean_setting_hands_every_freed_buffer_back():
    [lean] = _probe(SWIN_MALLOC="lean")
    assert lean["in_force"] == "lean"
    assert lean["faults"] > PAGES // 2, lean  # a fresh mapping each time: glibc's threshold did not rise
    assert lean["freed_mb"] > 36, lean  # and its free returns the whole buffer
    assert lean["freed_smaller_mb"] > 3.5, lean  # a 4 MiB one too: the threshold stays at 1 MiB


@glibc_only
def test_fit_with_gradient_checkpointing_switches_to_lean_unless_swin_malloc_is_set():
    plain, checkpointing = _probe(CLI_FIT)
    assert plain["freed_mb"] < 4, plain  # no checkpointing: the CLI's default, heap, stays
    assert checkpointing["freed_mb"] > 36 and checkpointing["in_force"] == "heap", checkpointing
    _, chosen = _probe(CLI_FIT, SWIN_MALLOC="heap")
    assert chosen["freed_mb"] < 4, chosen  # the user's SWIN_MALLOC wins


def test_user_settings_win_and_a_wrong_value_is_named(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.tune_malloc().startswith("left as set by")
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.tune_malloc("lean").startswith("left as set by")
    monkeypatch.setenv("SWIN_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="SWIN_MALLOC='jemalloc'"):
        allocator.tune_malloc("lean")
