"""``make demo [TASK=...]``: fit, test and predict a small Swin on CPU (TASK: one of TASKS, default classification).

The demo config writes its synthetic "shapes" dataset in the task's real layout under ``data/demo/`` the first time,
so the real loading code runs. Extra arguments go to every run, e.g. ``python -m swin.demo classification
--data.root /my/imagefolder``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from swin.cli import main as cli_main

TASKS = ("classification", "detection", "segmentation", "cascade", "retinanet", "fcos")


def run_demo(task: str, extra: list[str] | None = None, config_dir: str | os.PathLike = "configs/demo") -> dict:
    """Fit, then test and predict with the best checkpoint; returns the paths and test metrics."""
    if task not in TASKS:
        raise SystemExit(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")
    config = Path(config_dir) / f"{task}.yaml"
    if not config.is_file():
        raise SystemExit(f"{config} not found: run the demo from the repository root")
    extra = list(extra or [])
    start = time.time()
    runs = {}
    for stage in ("fit", "test", "predict"):
        args = [stage, "--config", str(config), *extra]
        if stage != "fit":
            args += ["--ckpt_path", runs["checkpoint"]]
        cli = cli_main(args)
        if stage == "fit":
            callback = cli.trainer.checkpoint_callback
            runs["checkpoint"] = callback.best_model_path or callback.last_model_path
            runs["fit_dir"] = cli.trainer.log_dir
        elif stage == "test":
            runs["test_dir"] = cli.trainer.log_dir
            runs["test_metrics"] = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        else:
            runs["predict_dir"] = str(Path(cli.trainer.log_dir) / "predictions")
    runs["seconds"] = time.time() - start
    return runs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    task = argv[0] if argv else "classification"
    runs = run_demo(task, argv[1:])
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(runs["test_metrics"].items()))
    print(
        f"\n[swin demo: {task}] done in {runs['seconds'] / 60:.1f} min\n"
        f"  best checkpoint: {runs['checkpoint']}\n"
        f"  training metrics: {runs['fit_dir']}/metrics.csv (TensorBoard: tensorboard --logdir {runs['fit_dir']})\n"
        f"  test metrics:     {metrics} ({runs['test_dir']}/metrics.csv)\n"
        f"  predictions:      {runs['predict_dir']}\n"
    )


if __name__ == "__main__":
    main()
