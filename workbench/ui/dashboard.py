"""``workbench dashboard NOTEBOOK``: a notebook served by Voila, a wall screen with no code cells.

A team watches a drill live: Voila runs the notebook in the project kernel when the page opens and
shows only its outputs (the live chart, Stop button, the verdict and the static figures).  Before
anything starts, every input is checked and refused in one line (exit 2): a notebook that is not
there or has no ``parameters`` cell, an unknown or mistyped parameter, a kernel that is not
installed, a port already taken, Voila missing (the ``notebooks`` extra).

Parameters (``-p NAME VALUE``) are injected the way papermill does it, into a copy of the notebook
in a temp folder that is removed at exit; a relative or default ``results_dir`` becomes an absolute
``./results`` of the folder the command was started in, so the run's results outlive the temp copy.

Why the served copy ends at the cell that runs the drill: Voila shows a page only once every cell
has run, and a cell's outputs only when it has finished.  So under ``WORKBENCH_WALL=1`` (set for
Voila's kernel) ``run_with_dashboard`` starts the drill in the background and returns at once; the
page appears within seconds, the live chart keeps drawing through the widget's messages, and the
verdict lands in the dashboard's status widget.  The checking cells after it (assertions on the
finished result) belong to the notebook and CI runs, not to a wall screen, and are left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DashboardError", "prepare", "serve", "voila_command"]


class DashboardError(ValueError):
    """A dashboard that cannot be served; the message is the one line the user sees."""


def _port_free(host: str, port: int) -> bool:
    """Whether Voila can bind ``port``: tested with ``SO_REUSEADDR`` as Tornado binds, so a port whose last
    connections linger in TIME_WAIT counts as free (it is: Voila will bind it) and only a listener refuses."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_of(nb: Any) -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    from workbench.run.notebooks import KERNEL

    wanted = (nb.metadata.get("kernelspec") or {}).get("name") or KERNEL
    specs = KernelSpecManager().find_kernel_specs()
    if wanted in specs:
        return wanted
    if wanted == KERNEL and "python3" in specs:
        return "python3"
    raise DashboardError(f"the notebook's kernel '{wanted}' is not installed: "
                         f"{sys.executable} -m ipykernel install --sys-prefix --name {wanted}")


def prepare(notebook: str | os.PathLike[str], parameters: Mapping[str, Any], folder: Path) -> tuple[Path, str]:
    """The notebook to serve (parameters injected, written into ``folder``) and its kernel name."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from workbench.run.notebooks import NotebookParameterError, check_parameters, notebook_parameters

    src = Path(notebook)
    if not src.is_file():
        raise DashboardError(f"no such notebook: {notebook}")
    try:
        nb = load_notebook_node(str(src))  # papermill's reader: every cell gets its tags list
    except Exception as exc:  # not JSON, not a notebook
        first = (str(exc).splitlines() or [""])[0][:60]
        raise DashboardError(f"{notebook} is not a notebook ({exc.__class__.__name__}: {first})") from None
    try:
        values = check_parameters(src, dict(parameters), from_text=True)
        declared = notebook_parameters(src)
    except NotebookParameterError as exc:
        raise DashboardError(str(exc)) from None
    if "results_dir" in declared:
        given = values.get("results_dir", declared["results_dir"]["default"])
        values["results_dir"] = str((Path.cwd() / (given or "results")).resolve())
    kernel = _kernel_of(nb)
    nb = parameterize_notebook(nb, values, kernel_name=kernel, language="python")
    runs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "run_with_dashboard(" in c.source]
    if runs:
        nb.cells = nb.cells[: runs[-1] + 1]
    dst = folder / src.name
    nbformat.write(nb, dst)
    return dst, kernel


def voila_command(notebook: Path, port: int, host: str = "127.0.0.1", *, open_browser: bool = False) -> list[str]:
    """The Voila command line: loopback, no code cells, no tracebacks to the viewers."""
    cmd = [sys.executable, "-m", "voila", str(notebook), f"--port={port}", f"--Voila.ip={host}",
           "--Voila.port_retries=0", "--strip_sources=True", "--show_tracebacks=False", "--theme=light"]
    if not open_browser:
        cmd.append("--no-browser")
    return cmd


def serve(notebook: str | os.PathLike[str], parameters: Mapping[str, Any], *, port: int = 8866,
          host: str = "127.0.0.1", open_browser: bool = False) -> int:
    """Serve until Ctrl-C (or Voila exits); returns Voila's exit status (0 after Ctrl-C)."""
    import voila  # noqa: F401  (missing: the CLI names the extra to install)

    if not _port_free(host, port):
        raise DashboardError(f"port {port} on {host} is taken: pick another with --port")
    folder = Path(tempfile.mkdtemp(prefix="wb-dashboard-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        served, kernel = prepare(notebook, parameters, folder)
        env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_HEADLESS"}  # live widgets wanted
        env["WORKBENCH_WALL"] = "1"  # the drill runs on after its cell (see the module docstring)
        print(json.dumps({"dashboard": f"http://{host}:{port}/", "notebook": str(notebook), "kernel": kernel}),
              flush=True)
        proc = subprocess.Popen(voila_command(served, port, host, open_browser=open_browser), cwd=folder, env=env)
        # SIGTERM too ends Voila cleanly (it shuts its kernels down, and they their drills).
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def add_arguments(parser: Any) -> None:
    """The ``workbench dashboard`` flags."""
    parser.add_argument("notebook", help="the notebook to serve (e.g. notebooks/quickstart.ipynb)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--port", type=int, default=8866, help="loopback port (default 8866)")
    parser.add_argument("--open", action="store_true", help="open it in the default browser")


def main(args: Any) -> int:
    """``workbench dashboard NOTEBOOK``: 0 after Ctrl-C, 2 for bad input (one line), else Voila's status."""
    try:
        return serve(args.notebook, dict(args.parameter), port=args.port, open_browser=args.open)
    except DashboardError as exc:
        print(f"workbench dashboard: {exc}", file=sys.stderr)
        return 2
