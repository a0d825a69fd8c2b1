"""Shared pieces of the distributed tests: the repository, tiny overrides of each demo config, running cli.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_BACKBONE = '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}'
BATCH = 2  # per device
LR_BATCH = 8  # lr is given per 8 images, so the printed lr shows the global batch


def tiny_args(task: str, data: Path) -> list[str]:
    """``cli.py`` arguments shrinking ``configs/demo/<task>.yaml`` to seconds on a CPU; its data goes under ``data``."""
    common = [
        f"--config={REPO / 'configs' / 'demo' / f'{task}.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--model.backbone_kwargs={TINY_BACKBONE}",
        f"--model.lr_batch_size={LR_BATCH}",
        f"--data.batch_size={BATCH}",
        "--data.num_workers=0",
        "--data.synthetic=true",
    ]
    if task == "classification":
        return common + [
            f"--data.root={data / 'imagefolder'}",
            # 4 + 2 images per class; 10 val images: an even split over 2 ranks, no padding
            '--data.synthetic_kwargs={"num_train": 4, "num_val": 2, "image_size": 32}',
            "--data.image_size=32",
        ]
    if task in ("detection", "cascade"):  # cascade: configs/demo/cascade.yaml (SyncBatchNorm needs CUDA: plain BN here)
        return common + [
            "--trainer.limit_val_batches=1",
            f"--data.root={data / 'coco'}",
            '--data.synthetic_kwargs={"num_train": 8, "num_val": 4, "image_size": 64}',
            "--data.train_sizes=[64]",
            "--data.max_size=64",
            "--model.fpn_channels=16",
            "--model.representation_size=32",
            "--model.mask_channels=16",
            "--model.min_size=64",
            "--model.max_size=64",
        ]
    if task == "segmentation":
        return common + [
            "--trainer.limit_val_batches=1",
            f"--data.root={data / 'ade20k'}",
            '--data.synthetic_kwargs={"num_train": 8, "num_val": 4, "image_size": 64}',
            "--data.base_size=[64, 64]",
            "--data.crop_size=32",
            "--model.channels=16",
            "--model.aux_channels=8",
        ]
    raise ValueError(task)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM's or a previous run's variables, one thread per process."""
    drop = ("SLURM_", "SWIN_RUN_VERSION", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **extra)
    return env


def run_cli(*args: str, timeout: float = 300) -> str:
    """Run ``python cli.py ARGS`` from the repository root; return its output, fail with its tail."""
    proc = subprocess.run(
        [sys.executable, "cli.py", *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"cli.py {' '.join(args[:1])} exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc.stdout


LR_LINE = re.compile(r"\[swin\] global batch (\d+): lr ([0-9.e+-]+) \(([0-9.e+-]+) per (\d+)\)")


def logged_lr(output: str) -> tuple[int, float, float, int]:
    """(global batch, scaled lr, base lr, lr batch) from BaseTask's start-up line."""
    found = LR_LINE.findall(output)
    assert len(found) == 1, f"expected one '[swin] global batch' line (rank 0 only), found {found}:\n{output[-3000:]}"
    batch, lr, base, per = found[0]
    return int(batch), float(lr), float(base), int(per)


@pytest.fixture(scope="session")
def dist():
    """The helpers above, for the test modules (pytest's importlib mode does not import conftest by name)."""
    return SimpleNamespace(
        repo=REPO,
        python=sys.executable,
        batch=BATCH,
        backbone=json.loads(TINY_BACKBONE),
        tiny_args=tiny_args,
        clean_env=clean_env,
        run_cli=run_cli,
        logged_lr=logged_lr,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster (scripts/slurm/local_cluster.py) for the session; its ``SLURM_CONF`` path.

    Skips only when apt-get cannot install slurm-wlm and munge, and fails instead when ``CI`` is set (CI must run
    these tests); any other failure to start is an error.
    """
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "scripts" / "slurm" / "local_cluster.py")
    cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cluster)
    try:
        cluster.ensure_installed()
    except cluster.InstallError as err:
        reason = f"SLURM tests need slurm-wlm and munge, and apt-get could not install them: {err}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the cluster must come up)")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="swin-slurm-"))  # short: the munge socket's path must fit 107 bytes
    try:
        yield cluster.up(root)
    finally:
        cluster.down(root)
