"""Every task under DDP with 2 real processes on CPU (gloo) through ``cli.py``, and the trainer configs.

Checks: the learning rate follows the real global batch, validation metrics are synced across ranks (DDP values
equal a single-process validation of the same checkpoint), checkpoints load under another strategy and into
``load_pretrained``, predict under DDP writes each image once, FSDP's full state dict has the plain module keys.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from swin.cli import main
from swin.data.shapes import SHAPE_CLASSES
from swin.models import build_swin
from swin.models.weights import load_pretrained

pytestmark = pytest.mark.slow  # 2-process runs: make test, not make test-fast

DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]
TRAIN_STEPS = 2  # limit_train_batches x max_epochs of the tiny runs
TRAINER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "trainer"


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column of a CSVLogger file."""
    out: dict[str, float] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v != ""})
    return out


def assert_two_ranks_and_scaled_lr(dist, output: str) -> None:
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    batch, lr, base, per = dist.logged_lr(output)
    assert batch == 2 * dist.batch, f"global batch {batch} is not {dist.batch} per device x 2 devices"
    assert lr == pytest.approx(base * batch / per, rel=2e-3)


def assert_backbone_loads(dist, ckpt: Path, **build_kwargs) -> None:
    """The Lightning checkpoint loads strictly into a fresh backbone through load_pretrained, tensor for tensor."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = build_swin("custom", **dist.backbone, **build_kwargs)
    load_pretrained(model, ckpt, strict=True)
    anchor = "layers.0.blocks.0.attn.qkv.weight"
    prefix = next(k for k in state if k.endswith(anchor))[: -len(anchor)]
    loaded = 0
    for name, value in model.state_dict().items():
        if prefix + name in state:
            torch.testing.assert_close(value, state[prefix + name], rtol=0, atol=0, msg=name)
            loaded += 1
    assert loaded >= 20, f"only {loaded} backbone tensors matched under prefix {prefix!r}"


def test_classification_ddp_fit_validate_predict(tmp_path, dist, monkeypatch):
    runs = tmp_path / "runs"
    args = [*dist.tiny_args("classification", tmp_path), f"--trainer.default_root_dir={runs}"]

    out = dist.run_cli("fit", *args, *DDP)
    assert_two_ranks_and_scaled_lr(dist, out)
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == TRAIN_STEPS
    assert_backbone_loads(dist, ckpt, num_classes=len(SHAPE_CLASSES))
    ddp_val = last_metrics(runs / "version_0" / "metrics.csv")

    # the DDP checkpoint under the single-device strategy (cli.py validate, in this process): the same validation
    # numbers, so DDP synced them across the ranks
    monkeypatch.setenv("SWIN_RUN_VERSION", "")  # the CLI records its run folder there; undone after the test
    main(["validate", *args, "--trainer.devices=1", f"--ckpt_path={ckpt}"])
    single_val = last_metrics(runs / "version_1" / "metrics.csv")
    assert single_val["val/loss"] == pytest.approx(ddp_val["val/loss"], rel=1e-5)
    assert single_val["val/acc1"] == pytest.approx(ddp_val["val/acc1"], abs=1e-6)

    # predict under DDP: an odd number of images, so the distributed sampler pads one rank with a repeat
    images = sorted((tmp_path / "imagefolder" / "val").rglob("*.JPEG"))[:7]
    predict_root = tmp_path / "predict"
    predict_root.mkdir()
    for image in images:
        shutil.copy(image, predict_root / image.name)
    dist.run_cli("predict", *args, *DDP, f"--ckpt_path={ckpt}", f"--data.predict_root={predict_root}")
    with open(runs / "version_2" / "predictions" / "predictions.csv", newline="") as f:
        paths = [Path(row["path"]).name for row in csv.DictReader(f)]
    assert sorted(paths) == sorted(p.name for p in images)


@pytest.mark.parametrize("task", ["detection", "cascade", "segmentation"])
def test_dense_task_ddp_fit_and_checkpoint(task, tmp_path, dist):
    runs = tmp_path / "runs"
    out = dist.run_cli("fit", *dist.tiny_args(task, tmp_path), f"--trainer.default_root_dir={runs}", *DDP)
    assert_two_ranks_and_scaled_lr(dist, out)
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == TRAIN_STEPS
    assert_backbone_loads(dist, ckpt, num_classes=None, out_indices=(0, 1, 2, 3))


def printed_config(capsys, *configs: Path) -> dict:
    args = ["fit"] + [f"--config={c}" for c in configs] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_trainer_configs_merge_with_task_configs(capsys):
    configs = TRAINER_CONFIGS.parent
    seg = printed_config(
        capsys, configs / "segmentation/upernet_swin_t_ade20k_160k.yaml", TRAINER_CONFIGS / "ddp.yaml"
    )["trainer"]
    assert (seg["strategy"], seg["devices"], seg["sync_batchnorm"]) == ("ddp", "auto", True)

    cls = printed_config(
        capsys,
        configs / "classification/swin_t_imagenet1k.yaml",
        TRAINER_CONFIGS / "fsdp.yaml",
        TRAINER_CONFIGS / "bf16.yaml",
        TRAINER_CONFIGS / "multinode.yaml",
    )["trainer"]
    assert cls["precision"] == "bf16-mixed"
    assert (cls["num_nodes"], cls["devices"], cls["strategy"]) == (2, 8, "ddp")  # the last config wins

    fsdp = printed_config(capsys, configs / "classification/swin_t_imagenet1k.yaml", TRAINER_CONFIGS / "fsdp.yaml")
    strategy = fsdp["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["state_dict_type"] == "full"
    policies = ("auto_wrap_policy", "activation_checkpointing_policy")
    assert [strategy["init_args"][p] for p in policies] == [["swin.models.swin.SwinBlock"]] * 2


def test_fsdp_full_state_dict_loads_into_load_pretrained(tmp_path, dist):
    """FSDP (CPU, gloo, 2 processes, FULL_SHARD) with fsdp.yaml's policies: one unit and one activation checkpoint
    per Swin block, and the full state dict Lightning saves has the plain keys and values, so the checkpoint loads
    into load_pretrained (and under any other strategy)."""
    worker = Path(__file__).with_name("fsdp_worker.py")
    out = tmp_path / "fsdp.pt"
    args = [str(tmp_path / "store"), str(out), str(TRAINER_CONFIGS / "fsdp.yaml"), json.dumps(dist.backbone)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), "2", *args],
            env=dist.clean_env(),
            cwd=dist.repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(ranks):
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"FSDP rank {rank} failed:\n{output[-4000:]}"
    saved = torch.load(out, map_location="cpu", weights_only=True)
    reference = saved["reference"]
    blocks = sum(dist.backbone["depths"])
    assert (saved["units"], saved["checkpointed"]) == (1 + blocks, blocks)  # the root + one unit per block
    assert {k.removeprefix("backbone.") for k in saved["checkpoint"]["state_dict"]} == set(reference)

    ckpt = tmp_path / "fsdp.ckpt"
    torch.save(saved["checkpoint"], ckpt)
    fresh = build_swin("custom", **dist.backbone, num_classes=len(SHAPE_CLASSES))
    load_pretrained(fresh, ckpt, strict=True)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
