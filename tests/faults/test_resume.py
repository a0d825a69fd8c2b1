"""A run SIGKILLed and resumed with ``--ckpt_path last`` equals the run that was never stopped: the same weights,
EMA, optimiser and schedule bit for bit, the same ``metrics.csv`` rows and TensorBoard scalars, the same images
in the same order (the rest of the epoch after a resume part-way through it)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def batches(path: Path) -> dict[int, list[str]]:
    """The recorded batches by global step, a later record of a step (the resumed run's) over an earlier one."""
    out = {}
    for line in path.read_text().splitlines():
        step, *paths = line.split()
        out[int(step)] = paths
    return out


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reference(faults, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    config = faults.write_config(tmp)
    record = ["--trainer.callbacks+=probes.RecordBatches", f"--trainer.callbacks.output={tmp / 'batches'}"]
    faults.fit(config, tmp / "runs", *record)
    return tmp, config


# last.ckpt every 2 steps and after every validation. Killed at the start of step 7: resumed from last.ckpt of
# step 6, in the middle of epoch 1; at step 9, from last.ckpt written after epoch 1's validation; during epoch 1's
# validation, from last.ckpt of step 6 (none is taken at an epoch's last batch, step 8): steps 6 and 7 run again
@pytest.mark.parametrize("kill_at, validation", [(7, False), (9, False), (8, True)])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(faults, reference, tmp_path, kill_at, validation):
    ref, config = reference
    record = ["--trainer.callbacks+=probes.RecordBatches", f"--trainer.callbacks.output={tmp_path / 'batches'}"]
    killed = faults.fit(config, tmp_path / "runs", *record, "--trainer.callbacks+=probes.KillAt",
                        f"--trainer.callbacks.step={kill_at}", f"--trainer.callbacks.validation={validation}",
                        check=False)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = torch.load(tmp_path / "runs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == {7: 6, 9: 8, 8: 6}[kill_at]
    resumed = faults.fit(config, tmp_path / "runs", "--ckpt_path", "last", *record)
    assert f"resuming from {tmp_path / 'runs' / 'version_0' / 'checkpoints' / 'last.ckpt'}" in resumed.stderr
    assert not (tmp_path / "runs" / "version_1").exists()  # it logged on in the checkpoint's folder
    names = [sorted(p.name for p in (r / "runs/version_0/checkpoints").iterdir()) for r in (ref, tmp_path)]
    assert names[0] == names[1]  # the same best checkpoint, no temporary left

    a = torch.load(ref / "runs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "runs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (12, 2)
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])
    assert a["lr_schedulers"] == b["lr_schedulers"]

    rows = [(ref / "runs/version_0/metrics.csv").read_text(), (tmp_path / "runs/version_0/metrics.csv").read_text()]
    assert rows[0] == rows[1]
    steps = [int(r["step"]) for r in csv.DictReader(rows[1].splitlines()) if r["train/loss"]]
    assert steps == list(range(12))  # every training step once
    assert scalars(ref / "runs/version_0") == scalars(tmp_path / "runs/version_0")

    # the same images at every step, and each epoch (the resumed one too) sees every image once
    seen = batches(tmp_path / "batches")
    assert seen == batches(ref / "batches")
    for epoch in range(3):
        images = Counter(p for step in range(4 * epoch, 4 * epoch + 4) for p in seen[step])
        assert len(images) == 20 and set(images.values()) == {1}
