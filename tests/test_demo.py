"""``python -m swin.demo`` (what ``make demo`` runs) end to end: fit, test and predict, shrunk to seconds."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_fits_tests_and_predicts(tmp_path):
    data, runs = tmp_path / "imagenet", tmp_path / "runs"
    tiny = [
        f"--data.root={data}",
        f"--data.predict_root={data / 'val'}",
        '--data.synthetic_kwargs={"num_train": 4, "num_val": 2, "image_size": 32}',
        "--data.image_size=32",
        "--data.batch_size=4",
        '--model.backbone_kwargs={"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}',
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={runs}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SWIN_RUN_VERSION"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "swin.demo", "classification", *tiny],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "[swin demo: classification] done" in out, out[-3000:]
    best = Path(re.search(r"best checkpoint: (\S+)", out).group(1))
    assert best.is_file() and best.is_relative_to(runs) and best.name.startswith("best-epoch")
    acc1 = float(re.search(r"test/acc1 ([0-9.]+)", out).group(1))
    predictions = Path(re.search(r"predictions:\s+(\S+)", out).group(1)) / "predictions.csv"
    rows = list(csv.DictReader(open(predictions)))
    assert len(rows) == 5 * 2  # 5 classes x 2 validation images, each predicted once
    # the printed test accuracy is that of the written predictions (same checkpoint, same images)
    hits = sum(r["class1"] == Path(r["path"]).parent.name for r in rows)
    assert acc1 == pytest.approx(hits / len(rows), abs=1e-3)
