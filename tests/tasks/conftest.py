"""Shared by the task tests: ``cli.py`` run in-process, into a folder of the test's own."""

from pathlib import Path

import pytest

from swin.cli import main


def run_cli(command: str, config: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, *args: str, name: str | None = None):
    """``cli.py command --config config``, logging to ``tmp/runs/<name or command>/version_0``."""
    monkeypatch.setenv("SWIN_RUN_VERSION", "")  # the CLI records its run folder here; undone after the test
    root = Path(tmp) / "runs" / (name or command)
    return main([command, "--config", str(config), "--trainer.default_root_dir", str(root), *args])


@pytest.fixture(scope="session")
def run():
    """:func:`run_cli`, for tests and fixtures of any scope."""
    return run_cli
