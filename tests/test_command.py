"""The `mwprune` console command: the same options as `python -m jobs.prune`."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def entry():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mwprune"]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def test_console_script_is_the_job_cli(monkeypatch, capsys):
    cli = entry()
    monkeypatch.setattr(sys, "argv", ["mwprune", "--help"])
    with pytest.raises(SystemExit) as e:
        cli()
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: mwprune")
    for opt in ("--calib", "--text-field", "--eval-protocol", "--tasks", "--stages"):
        assert opt in usage
    monkeypatch.setattr(sys, "argv", ["mwprune", "--method", "obs"])
    with pytest.raises(SystemExit) as e:
        cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "'obs'" in err[0], err


def test_installed_command_runs():
    """Where the package is installed (setup.sh: pip install -e .), the command is on the venv's path."""
    exe = Path(sys.executable).with_name("mwprune")
    if not exe.exists():
        pytest.skip("mwprune not installed in this environment (pip install -e .)")
    r = subprocess.run([str(exe), "--method", "obs"], capture_output=True, text=True, cwd=ROOT)
    from pipeline.run import METHODS
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: unknown method 'obs'; choose one of "
                                                                    f"{', '.join(METHODS)}"]
