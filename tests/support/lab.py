"""A JupyterLab on loopback, and a Playwright driver for the notebooks in it.

:class:`Lab` starts ``jupyter lab`` from the venv on a free loopback port with a random token, the
project kernel, ``window.jupyterapp`` exposed (page scripts reach the app only then), no news or
update checks, and temp settings, workspace and runtime folders, so a user's own JupyterLab state
neither leaks in nor is changed.  :meth:`Lab.stop` shuts it down through its API (which shuts its
kernels down) and then ends, by pid, every process of its tree still alive, drill nodes included.

:class:`LabPage` drives one notebook through JupyterLab's own commands (open, Run All, read the
cells' outputs from the notebook model) and reads the live dashboard's DOM contract
(``div.wb-live`` with ``data-draws``/``data-points``, see ``workbench/ui/live_chart.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import psutil

from workbench.run.processes import free_port

__all__ = ["KERNEL", "Lab", "LabPage", "ServerProcess", "free_port", "notebook_copy"]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
KERNEL = "rating-edge"  # the project kernel the Makefile installs

# The app's current notebook panel and its kernel.
_PANEL = "(window.jupyterapp && window.jupyterapp.shell.currentWidget)"
KERNEL_STATUS_JS = f"""(() => {{ const w = {_PANEL};
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null; }})()"""
NOTEBOOK_READY_JS = f"""(() => {{ const w = {_PANEL};
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(k && k.status === 'idle' && w.content && w.content.widgets && w.content.widgets.length > 0); }})()"""
# No cell running or queued (JupyterLab's kernel indicator says idle during a top-level ``await``).
CELLS_DONE_JS = f"""(() => {{ const w = {_PANEL}; if (!w || !w.content || !w.content.widgets) return false;
  return w.content.widgets.every(c => c.model.type !== 'code' || c.model.executionState !== 'running'); }})()"""
# Every output of every cell, as nbformat JSON (the notebook model, not the DOM).
OUTPUTS_JS = f"""(() => {{ const w = {_PANEL};
  return w.content.widgets.map(c => (c.model.outputs ? c.model.outputs.toJSON() : [])); }})()"""
# All the text the outputs hold (streams, text/plain, text/html, errors), from the notebook model: JupyterLab
# renders only the cells in view (windowed notebook), so the DOM's text depends on the scroll position.
OUTPUT_TEXT_JS = f"""(() => {{ const w = {_PANEL}; if (!w || !w.content || !w.content.widgets) return '';
  const s = (v) => Array.isArray(v) ? v.join('') : (v || '');
  return w.content.widgets.flatMap(c => (c.model.outputs ? c.model.outputs.toJSON() : [])).map(o =>
    s(o.text) + ' ' + s(o.data && o.data['text/plain']) + ' ' + s(o.data && o.data['text/html']) + ' '
    + (o.evalue || '')).join('\\n'); }})()"""
# The live dashboard (workbench/ui/live_chart.py): draws so far and points drawn.
LIVE_JS = """(() => { const el = document.querySelector('.jp-OutputArea .wb-live');
  return el ? {draws: +el.dataset.draws || 0, points: +el.dataset.points || 0,
               firstDrawMs: el.dataset.firstDrawMs ? +el.dataset.firstDrawMs : null,
               pixels: [...el.querySelectorAll('canvas')].map(c => c.toDataURL().length)} : null; })()"""
STATUS_JS = "((document.querySelector('.jp-OutputArea .wb-status') || {}).innerText || '')"
STOP_BUTTON = ".jp-OutputArea button:has-text('Stop')"
# The run is over when the dashboard replaced itself with its verdict and the static figures.
FINISHED_JS = f"/every invariant held|FAILED|run failed/.test({OUTPUT_TEXT_JS})"




def notebook_copy(notebook: Path, folder: Path, *, dst_name: str | None = None, **values: Any) -> Path:
    """``notebook`` copied into ``folder`` (as ``dst_name``) with parameters set (the parameters cell is
    edited, not replaced).

    The results folder is made absolute (``folder/results``): the repository's notebook is never
    touched and its results land in the test's temp folder.
    """
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {"results_dir": str(folder / "results"), **values}
    lines = cell.source.splitlines()
    for name, value in values.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{name} =")]
        if not at:
            raise ValueError(f"{notebook.name} has no parameter {name}")
        lines[at[0]] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    dst = folder / (dst_name or notebook.name)
    nbformat.write(nb, dst)
    return dst


class ServerProcess:
    """A server process in a session of its own; :meth:`stop` ends it and every process it started."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        full_env.pop("WORKBENCH_HEADLESS", None)  # live widgets wanted
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._tree: dict[int, psutil.Process] = {}

    def remember_children(self) -> None:
        """Note every process under the server (kernels, drill children, nodes) to end them at stop."""
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._tree[p.pid] = p

    def wait_http(self, url: str, timeout_s: float = 90.0, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.3)
        raise RuntimeError(f"{url} not ready in {timeout_s:g} s:\n{self.log_tail()}")

    def wait_port(self, port: int, timeout_s: float = 90.0) -> None:
        """Wait until the server accepts connections (for servers where a GET would start work)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.2)
        raise RuntimeError(f"port {port} not open in {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace") if self.log_path.exists() else ""

    def stop(self, graceful: Any = None) -> None:
        """``graceful()`` first (e.g. an API shutdown), then SIGTERM, SIGKILL; then leftovers by pid."""
        self.remember_children()
        if self.proc.poll() is None:
            steps: list[tuple[signal.Signals | None, float]] = [(signal.SIGTERM, 5), (signal.SIGKILL, 5)]
            if graceful is not None:
                with contextlib.suppress(OSError):
                    graceful()
                steps.insert(0, (None, 20))
            for sig, wait_s in steps:
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, sig)  # the session we created, no other
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        left = []
        for p in self._tree.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _gone, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()


class Lab(ServerProcess):
    """``jupyter lab`` serving ``root`` on loopback with a token."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        state = root.parent / "lab-state"
        notif = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notif.parent.mkdir(parents=True, exist_ok=True)
        notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")
        for sub in ("workspaces", "runtime"):
            (state / sub).mkdir(exist_ok=True)
        env = {"JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"), "JUPYTER_RUNTIME_DIR": str(state / "runtime")}
        cmd = [str(VENV_BIN / "jupyter"), "lab", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
               "--LabApp.expose_app_in_browser=True", f"--MappingKernelManager.default_kernel_name={KERNEL}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]  # no registry look-ups from the extension manager
        if os.geteuid() == 0:  # CI runs as root; JupyterLab refuses without this
            cmd.append("--allow-root")
        super().__init__(cmd, root, env, root.parent / "jupyterlab.log")
        self.wait_http(f"{self.base}/api/status", headers={"Authorization": f"token {self.token}"})

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"

    def stop(self, graceful: Any = None) -> None:
        def shutdown() -> None:
            req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST", data=b"",
                                         headers={"Authorization": f"token {self.token}"})
            urllib.request.urlopen(req, timeout=5).close()

        super().stop(graceful or shutdown)


class LabPage:
    """One notebook open in JupyterLab in a Playwright page."""

    def __init__(self, lab: Lab, page: Any, debug_dir: Path | None = None) -> None:
        self.lab, self.page, self.debug_dir = lab, page, debug_dir

    def open(self, notebook: str, timeout_s: float = 120.0) -> None:
        """Open ``notebook`` (relative to the lab's root) and wait until its kernel is idle."""
        self.page.goto(self.lab.url(notebook), wait_until="domcontentloaded", timeout=timeout_s * 1000)
        self.page.wait_for_function(NOTEBOOK_READY_JS, timeout=timeout_s * 1000, polling=250)
        self.lab.remember_children()
        self.page.evaluate("() => { window.jupyterapp.shell.collapseLeft(); window.jupyterapp.shell.collapseRight(); }")

    def run_all(self) -> float:
        """Run every cell through JupyterLab's own command (not awaited: it resolves when all have run)."""
        t = time.monotonic()
        self.page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        return t

    def evaluate(self, js: str) -> Any:
        return self.page.evaluate(f"() => {js}")

    def live(self) -> dict[str, Any] | None:
        return self.evaluate(LIVE_JS)

    def status(self) -> str:
        return str(self.evaluate(STATUS_JS)).strip()

    def kernel_status(self) -> str | None:
        return self.evaluate(KERNEL_STATUS_JS)

    def wait(self, js: str, timeout_s: float, poll_ms: int = 200) -> Any:
        """Wait until ``js`` is truthy; on a timeout the error carries the notebook's text and the
        server log's tail (and a screenshot goes to ``debug_dir`` when set)."""
        try:
            return self.page.wait_for_function(f"() => {js}", timeout=timeout_s * 1000, polling=poll_ms).json_value()
        except Exception as exc:
            if self.debug_dir is not None:
                self.page.screenshot(path=str(self.debug_dir / f"timeout-{int(time.time())}.png"))
            with contextlib.suppress(Exception):
                text = self.output_text()[-1500:]
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {js[:160]}\n--- notebook:\n"
                                     f"{text}\n--- server log:\n{self.lab.log_tail(1500)}") from exc
            raise

    def wait_idle(self, timeout_s: float = 120.0) -> None:
        """Wait until no cell is running or queued and the kernel is idle."""
        self.wait(f"{CELLS_DONE_JS} && {KERNEL_STATUS_JS} === 'idle'", timeout_s, 300)

    def outputs(self) -> list[list[dict[str, Any]]]:
        """Every cell's outputs as nbformat JSON (``output_type`` 'error' for an exception)."""
        return self.evaluate(OUTPUTS_JS)

    def errors(self) -> list[str]:
        """``Name: value`` of every error output in the notebook."""
        return [f"{o.get('ename')}: {o.get('evalue')}" for cell in self.outputs() for o in cell
                if o.get("output_type") == "error"]

    def text(self) -> str:
        """What the page shows of the notebook (cells in view only: JupyterLab renders those)."""
        return str(self.evaluate("document.querySelector('.jp-Notebook').innerText"))

    def output_text(self) -> str:
        """The text of every output of every cell, from the notebook model."""
        return str(self.evaluate(OUTPUT_TEXT_JS))

    def wait_output(self, pattern: str, timeout_s: float) -> None:
        """Wait until some output matches the JS regular expression ``pattern``."""
        self.wait(f"/{pattern}/.test({OUTPUT_TEXT_JS})", timeout_s, 300)

    def plotly_outputs(self) -> int:
        """Outputs that carry a plotly figure (drawn by JupyterLab's plotly renderer)."""
        return sum(1 for cell in self.outputs() for o in cell
                   if "application/vnd.plotly.v1+json" in (o.get("data") or {}))
