"""SWIN_MALLOC: the glibc setting the CLI and the benchmark apply keeps freed tensor buffers for the next step."""

import json
import os
import subprocess
import sys

import pytest

from swin import allocator

# a fresh process: buffers of about 40 MiB (above glibc's largest mmap threshold; each a little smaller than the one
# before, as activations of varying size are) written and freed three times, then once more; the minor page faults of
# the last one are counted
PROBE = """
import json, resource, torch
from swin.allocator import tune_malloc
in_force = tune_malloc()
def written(i): return torch.empty((10 << 20) - i * 4096).fill_(1.0)
for i in range(3):
    written(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
c = written(3)
print(json.dumps({"in_force": in_force, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "SWIN_MALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")
def test_heap_setting_reuses_freed_buffers_where_glibc_faults_them_in_again():
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    heap, default = _probe(), _probe(SWIN_MALLOC="default")
    assert heap["in_force"] == "heap" and default["in_force"] == "default"
    assert heap["faults"] < pages // 20, heap  # the freed buffers' pages are reused
    assert default["faults"] > pages // 2, default  # glibc unmapped them: every page faulted in again


def test_user_settings_win_and_a_wrong_value_is_named(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.tune_malloc().startswith("left as set by")
    monkeypatch.setenv("SWIN_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="SWIN_MALLOC='jemalloc'"):
        allocator.tune_malloc()
