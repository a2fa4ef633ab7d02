"""``workbench dashboard NOTEBOOK``: bad input is one line and exit 2, before Voila or a kernel starts; a
command whose extra is missing names the extra to install, in one line, exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main

pytestmark = [pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path):
    bad = tmp_path / "plain.ipynb"
    bad.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}', encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            "no such notebook": [str(tmp_path / "missing.ipynb")],
            "no cell tagged 'parameters'": [str(bad)],
            "has no such parameter": [str(NOTEBOOK), "-p", "bogus", "1"],
            "expected float": [str(NOTEBOOK), "-p", "duration_s", "soon"],
            f"port {port} on 127.0.0.1 is taken": [str(NOTEBOOK), "--port", str(port)],
        }
        for expected, args in cases.items():
            proc = subprocess.run([sys.executable, "-m", "workbench.cli", "dashboard", *args], capture_output=True,
                                  text=True, timeout=60, cwd=tmp_path)
            assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
    assert not list(tmp_path.glob("results")), "bad input left a results folder behind"


def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setitem(sys.modules, "voila", None)  # what an install without the notebooks extra meets
    assert main(["dashboard", str(NOTEBOOK)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["workbench dashboard: needs voila, from the 'notebooks' extra: "
                   "pip install 'rating-edge-workbench[notebooks]'"]


def test_a_missing_base_module_says_the_install_is_incomplete(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], tmp_path: Path):
    monkeypatch.setitem(sys.modules, "papermill", None)
    assert main(["run", str(NOTEBOOK), "-o", str(tmp_path / "out.ipynb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs papermill" in err[0] and "pip install --force-reinstall" in err[0], err
    assert not (tmp_path / "out.ipynb").exists()


def test_a_port_in_time_wait_counts_as_free_as_voila_binds_it():
    """The suite's free ports are checked with SO_REUSEADDR; a stricter check here refused one whose last
    connection lingered in TIME_WAIT (a CI run failed so) although Tornado would have bound it."""
    from workbench.ui.dashboard import _port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the suite's servers bind
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        served, _ = listener.accept()
        served.close()  # the side that closes first holds TIME_WAIT on the listening port
        client.close()
    with socket.socket() as plain:
        try:
            plain.bind(("127.0.0.1", port))
            lingering = False
        except OSError:
            lingering = True
    assert _port_free("127.0.0.1", port), "a port only in TIME_WAIT was called taken"
    if not lingering:
        pytest.skip("the kernel left no TIME_WAIT on the port; the case did not arise")
