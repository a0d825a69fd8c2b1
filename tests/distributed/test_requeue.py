"""The SLURM requeue callback without a cluster: SIGUSR1 sent in process, ``scontrol`` replaced by a script.

The job is a one-task SLURM job as Lightning sees it (SLURM_* variables); the preempted run must stop at the batch
that saw the signal with ``hpc_ckpt_1.ckpt`` saved and the requeue asked for, and the requeued run must come back
with exactly the optimizer, scheduler and learning rate that the first one had when it stopped.
"""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from lightning.pytorch import Callback

from swin.callbacks import SLURMRequeue
from swin.cli import main

EPOCHS, PER_EPOCH, SIGNAL_AT = 2, 4, 3  # the signal arrives in the middle of the first epoch


def training_state(trainer) -> dict:
    """What a resume must restore: step, optimizer state, scheduler state and the current learning rates."""
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    return {
        "step": trainer.global_step,
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "lr": [group["lr"] for group in optimizer.param_groups],
    }


class Preempt(Callback):
    """Sends SIGUSR1 to this process at the end of step ``at``, as SLURM does before a job's time limit."""

    def __init__(self, at: int) -> None:
        self.at, self.state = at, None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            self.state = training_state(trainer)
            os.kill(os.getpid(), signal.SIGUSR1)


class Probe(Callback):
    """Records the state training starts from and the steps it runs."""

    def __init__(self) -> None:
        self.start, self.steps = None, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = training_state(trainer)

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append(trainer.global_step)


def fit(args: list[str], callback: Callback):
    cli = main(args, run=False)
    cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.trainer


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_requeue_saves_requeues_and_the_resume_restores_optimizer_scheduler_and_lr(tmp_path, monkeypatch, request, dist):
    calls = tmp_path / "scontrol.calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="fit",
                           SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "runs"
    args = [a for a in dist.tiny_args("classification", tmp_path) if not a.startswith("--trainer.max_epochs")]
    args += [f"--trainer.max_epochs={EPOCHS}", f"--trainer.limit_train_batches={PER_EPOCH}",
             f"--trainer.default_root_dir={root}"]
    previous_handler = signal.getsignal(signal.SIGUSR1)  # the callback's handler stays after a stop: undo it after
    request.addfinalizer(lambda: signal.signal(signal.SIGUSR1, previous_handler))

    preempt = Preempt(at=SIGNAL_AT)
    with pytest.raises(SystemExit):  # SLURMRequeue stops every rank right after saving (SIGTERMException)
        fit(args, preempt)
    hpc = root / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert saved["global_step"] == SIGNAL_AT  # saved at the batch that saw the signal, not later
    assert calls.read_text().split() == ["requeue", "4242"]

    probe = Probe()
    trainer = fit(args, probe)  # the requeued job: Lightning resumes from the newest hpc_ckpt_N under SLURM
    assert probe.start["step"] == SIGNAL_AT and probe.start["lr"] != training_state(trainer)["lr"]
    assert_same(probe.start, preempt.state, "restored")
    assert probe.steps == list(range(SIGNAL_AT + 1, EPOCHS * PER_EPOCH + 1))
    assert any(isinstance(c, SLURMRequeue) for c in trainer.callbacks)
