"""scripts/gpu_check.py, the prepared GPU check, runs end to end on a CPU with tiny sizes (``--device cpu --tiny``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    fits = [p for name, p in parts.items() if name.startswith("fit ") and p["status"] != "skipped"]
    assert len(fits) == 5 and all(p["status"] == "ok" for p in fits)  # the three tasks, the cascade, the compiled fit
    assert any("cascade" in name for name in parts)
    for p in fits:  # StepTimer timed the steps after its warm-up, of the batch the run used
        assert p["steps_timed"] == 2 and p["step_s_median"] > 0 and p["batch_per_device"] in (2, 4)
        assert p["images_per_s"] == pytest.approx(p["batch_per_device"] / p["step_s_median"])
    benches = [p for name, p in parts.items() if name.startswith("bench ")]
    assert [p["status"] for p in benches] == ["ok", "ok"]
    assert {c["case"] for p in benches for c in p["cases"]} == {"infer bf16", "train bf16"}
    skipped = {name: p["note"] for name, p in parts.items() if p["status"] == "skipped"}
    assert any("FSDP" in name for name in skipped) and any("DDP on 2 GPUs" in name for name in skipped)
    table = (out / "gpu_check.md").read_text()
    assert all(p["name"] in table for p in fits) and "**skipped**" in table
