"""The documentation is true: every Python block of the README runs, every name the README and configs give resolves."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DOTTED = re.compile(r"(?<![\w./-])((?:swin|lightning|torch|torchvision|torchmetrics|albumentations)(?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"py", "yaml", "md", "json", "pth", "ckpt", "png", "safetensors", "onnx", "pt2"}


def dotted_names(text: str) -> set[str]:
    """Python dotted names (``swin.models.load_pretrained``, ``lightning.pytorch...``), not file names (``swin.py``)."""
    return {name for name in DOTTED.findall(text) if name.rsplit(".", 1)[-1] not in FILE_SUFFIXES}


def python_blocks(markdown: str) -> list[str]:
    """The text of every ```python fenced block."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def resolve(name: str) -> object:
    """Import the longest module prefix of a dotted name, then get the remaining attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def class_paths(node: object) -> list[str]:
    """Every ``class_path`` value in a parsed YAML tree."""
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for v in node.values() for p in class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in class_paths(v)]
    return []


def test_readme_has_python_blocks():
    assert python_blocks(README)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder holding the files the README's blocks name, e.g. an official-layout Swin-T checkpoint."""
    monkeypatch.chdir(tmp_path)
    from swin.models import swin_t

    torch.save({"model": swin_t().state_dict()}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    return tmp_path


@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_readme_python_block_runs(index, in_tmp):
    code = python_blocks(README)[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("name", sorted(dotted_names(README)))
def test_readme_dotted_names_resolve(name):
    resolve(name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_class_paths_and_dotted_names_resolve(config):
    text = config.read_text()
    names = set(class_paths(yaml.safe_load(text))) | dotted_names(text)
    for name in names:
        obj = resolve(name)
        assert obj is not None, name
    for path in class_paths(yaml.safe_load(text)):
        assert isinstance(resolve(path), type), f"{config}: class_path {path} is not a class"
