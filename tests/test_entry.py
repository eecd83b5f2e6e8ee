"""The console script's entry point: Ctrl-C while the command line loads."""

from __future__ import annotations

import importlib.abc
import signal
import subprocess
import sys

import pytest

import training
import training.entry as entry


class CtrlCDuringImport(importlib.abc.MetaPathFinder):
    """Sends this process SIGINT when a named module starts to load, as Ctrl-C does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            signal.raise_signal(signal.SIGINT)
        return None


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """Ctrl-C while `vaebm` imported torch and numpy (before training.cli's own guard runs)
    was a traceback, or numpy's ImportError about a broken install."""
    monkeypatch.setattr(sys, "argv", ["vaebm", "frobnicate"])  # exit 2 if the command ran
    monkeypatch.delitem(sys.modules, "training.cli", raising=False)
    if hasattr(training, "cli"):  # the re-import rebinds it: later tests get the module back
        monkeypatch.setattr(training, "cli", training.cli)
    monkeypatch.setattr(sys, "meta_path", [CtrlCDuringImport("training.cli"), *sys.meta_path])
    # Python's own handler, as in a terminal: a suite started as a background job inherits
    # an ignored SIGINT, which the entry point rightly leaves ignored.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = entry.main()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the import escaped as KeyboardInterrupt")
    finally:
        handler_after = signal.signal(signal.SIGINT, before)
    assert code == 130
    captured = capsys.readouterr()
    assert captured.err == entry.INTERRUPTED_BEFORE_START + "\n" and captured.out == ""
    assert handler_after is signal.default_int_handler


def test_the_entry_point_imports_nothing_heavy():
    """The guard only helps if importing it is instant: no torch, numpy or command modules."""
    code = (
        "import sys, training.entry; "
        "print(sorted(m for m in ('torch', 'numpy', 'training.cli') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_entry_point_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vaebm", "frobnicate"])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
