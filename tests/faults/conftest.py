"""Shared by the fault tests: a tiny classification run of ``cli.py fit``, started as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from swin.data import shapes

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 4  # 5 classes x 4 images, batch 5


def write_config(tmp: Path, epochs: int = 3, every: int = 2, **trainer) -> Path:
    """3 epochs of 4 steps on the shapes demo data, ``last.ckpt`` every ``every`` steps, drop path, mixup and EMA."""
    data = tmp / "shapes"
    if not data.exists():
        shapes.write_imagefolder(data, num_train=4, num_val=2, image_size=32)
    backbone = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.1}
    config = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "max_epochs": epochs, "log_every_n_steps": 1, "enable_progress_bar": False,
                    **trainer},
        "model": {"class_path": "swin.tasks.classification.ClassificationTask",
                  "init_args": {"backbone": "custom", "backbone_kwargs": backbone, "lr": 1e-3, "lr_batch_size": 8,
                                "warmup_epochs": 1, "ema_decay": 0.5, "checkpoint_every_n_steps": every}},
        "data": {"class_path": "swin.data.imagenet.ImageNetDataModule",
                 "init_args": {"root": str(data), "image_size": 32, "batch_size": 5, "num_workers": 0,
                               "randaugment": False}},
    }  # fmt: skip
    path = tmp / f"config-{epochs}-{every}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env() -> dict[str, str]:
    """This environment, one thread, one kernel path, the probes importable, without a SLURM job's or a previous
    run's variables."""
    drop = ("SLURM_", "SWIN_RUN_VERSION", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "PL_")
    out = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), out.get("PYTHONPATH")]))
    # one kernel path, no timed choice (swin.models.ops): timing makes a run's first step slower, and the random kills
    # are drawn for steps of even length (a kill before the first checkpoint starts a new run folder)
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path, SWIN_KERNELS="onednn")
    return out


def fit_command(config: Path, root: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config),
            "--trainer.default_root_dir", str(root), *args]  # fmt: skip


def fit(config: Path, root: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cli.py fit`` as a process; with ``check``, fail with its output unless it exits 0."""
    proc = subprocess.run(fit_command(config, root, *args), env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"fit {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def faults():
    """The helpers above, for the test modules (pytest's importlib mode does not import conftest by name)."""
    return SimpleNamespace(
        write_config=write_config, env=env, fit_command=fit_command, fit=fit, steps_per_epoch=STEPS_PER_EPOCH
    )
