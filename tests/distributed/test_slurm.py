"""scripts/slurm/fit.sbatch on a real one-node SLURM cluster: a 2-task job, and a preempted job that requeues.

The cluster (munged, slurmctld, slurmd) comes from scripts/slurm/local_cluster.py; jobs run the classification
demo config, shrunk, on CPU with 2 srun tasks (DDP over gloo, one process per task as on GPUs).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1", "--time=15"]


def submit(dist, conf: Path, tmp: Path, name: str, *cli_args: str) -> tuple[str, Path]:
    """sbatch the project's fit script as job ``name``; returns the job id and its output file."""
    output = tmp / f"{name}.out"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}", f"--chdir={dist.repo}", *SBATCH]
    cmd += [str(dist.repo / "scripts" / "slurm" / "fit.sbatch"), *dist.tiny_args("classification", tmp), *cli_args]
    env = dist.clean_env(SLURM_CONF=str(conf), PYTHON=dist.python, RUNS=str(tmp / "runs"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout.strip().split(";")[0], output


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_info(conf: Path, job: str, dist) -> dict[str, str]:
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=dist.clean_env(SLURM_CONF=str(conf)), capture_output=True, text=True
    )
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_for(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-5000:] if log.exists() else ""
            pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n{tail}")
        time.sleep(0.2)


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_sbatch_two_tasks(slurm_cluster, tmp_path, dist):
    job, output = submit(dist, slurm_cluster, tmp_path, "fit2")
    wait_for(lambda: job_info(slurm_cluster, job, dist).get("JobState") in DONE, 300, "the job's end", output)
    log = output.read_text()
    assert job_info(slurm_cluster, job, dist)["JobState"] == "COMPLETED", log[-5000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-5000:]
    batch, *_ = dist.logged_lr(log)
    assert batch == 2 * dist.batch

    run = tmp_path / "runs" / "fit2" / f"slurm_{job}"  # fixed root per experiment, version named after the job
    assert global_step(run / "checkpoints" / "last.ckpt") == 2
    trainer = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"])) == (1, "2")  # from the allocation


def logged_steps(run: Path) -> dict[int, list[int]]:
    """train/loss steps per writing process, from the TensorBoard event files of a run folder."""
    steps: dict[int, list[int]] = {}
    for events in sorted(run.glob("events.out.tfevents.*")):
        pid = int(events.name.split(".")[-2])
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            steps.setdefault(pid, []).extend(e.step for e in acc.Scalars("train/loss"))
    return steps


def test_preempted_job_requeues_and_resumes(slurm_cluster, tmp_path, dist):
    epochs, per_epoch, hold = 3, 4, 6  # the signal arrives at step 6, in the middle of the second epoch
    marker = tmp_path / "holding"
    gate = {"class_path": "tests.distributed.gate.HoldUntilSignalled", "init_args": {"step": hold, "marker": str(marker)}}
    job, output = submit(
        dist, slurm_cluster, tmp_path, "requeue", f"--trainer.max_epochs={epochs}",
        f"--trainer.limit_train_batches={per_epoch}", f"--trainer.callbacks+={json.dumps(gate)}",
    )
    root = tmp_path / "runs" / "requeue"
    run = root / f"slurm_{job}"
    # both ranks hold at step 6 until the signal has reached them: preempt the job there as SLURM does before its
    # time limit (--signal=SIGUSR1@90 sends SIGUSR1 to every task of the job's steps), however fast the machine is
    holding = lambda: all(Path(f"{marker}.{rank}").exists() for rank in (0, 1))  # noqa: E731
    wait_for(holding, 300, "both ranks holding at step 6", output)
    subprocess.run(["scancel", "--signal=USR1", job], env=dist.clean_env(SLURM_CONF=str(slurm_cluster)), check=True)
    wait_for(lambda: job_info(slurm_cluster, job, dist).get("JobState") in DONE, 300, "the job's end", output)

    info, log = job_info(slurm_cluster, job, dist), output.read_text()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log[-5000:]
    hpc = root / "hpc_ckpt_1.ckpt"
    assert f"Restored all states from the checkpoint at {hpc}" in log, log[-5000:]
    saved_at, total = global_step(hpc), epochs * per_epoch
    assert saved_at == hold

    # the requeued attempt (same job id, same version folder) went on from the saved step, not from 0: the steps
    # logged by the two attempts neither overlap nor leave a gap, but for the step whose end the checkpoint marks
    # (the preempted attempt stopped right after saving, before logging it)
    attempts = logged_steps(run)
    assert len(attempts) == 2, attempts
    first, second = (attempts[pid] for pid in sorted(attempts, key=lambda pid: min(attempts[pid])))
    assert (min(first), min(second), max(second)) == (0, saved_at, total - 1)
    assert sorted(first + second) == [step for step in range(total) if step != saved_at - 1]
