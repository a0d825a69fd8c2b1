"""Every YAML under configs/ parses through cli.py (``--print_config``) and its model builds (without data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse.typing import import_object

from swin.cli import main
from swin.tasks.base import BaseTask

REPO = Path(__file__).resolve().parents[1]
TASK_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "trainer")
TRAINER_CONFIGS = sorted((REPO / "configs" / "trainer").glob("*.yaml"))


def printed_config(capsys, *configs: Path) -> dict:
    """The config ``cli.py fit --config ... --print_config`` prints (jsonargparse checks every key and type)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[f"--config={c}" for c in configs], "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_task_config_parses_and_builds_its_model(config, capsys):
    printed = printed_config(capsys, config)
    model, data = printed["model"], printed["data"]
    assert isinstance(import_object(data["class_path"]), type), data["class_path"]
    task_class = import_object(model["class_path"])
    assert issubclass(task_class, BaseTask)
    init_args = {**model["init_args"], "pretrained": None}  # the released weights are not here; the network is
    task = task_class(**init_args)  # the full-size network (Swin-L: 0.8 GB for a moment)
    backbone = model["init_args"].get("backbone_kwargs") or {}
    if "embed_dim" in backbone:  # the config's backbone, not a default one
        assert task.backbone.patch_embed.proj.out_channels == backbone["embed_dim"]
    assert sum(p.numel() for p in task.parameters()) > 0


@pytest.mark.parametrize("trainer", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_config_merges_with_a_task_config(trainer, capsys):
    printed = printed_config(capsys, REPO / "configs" / "classification" / "swin_t_imagenet1k.yaml", trainer)
    given = yaml.safe_load(trainer.read_text())["trainer"]
    for key, value in given.items():
        if not isinstance(value, dict):  # strategies given as class_path blocks are checked in test_ddp.py
            assert printed["trainer"][key] == value, key
