"""A screenshot of JupyterLab in headless Chromium *during* a run of notebooks/quickstart.ipynb, live
charts visible: the issue's proof that the notebooks run in JupyterLab with live charts.

What it does, every process its own and ended by it:
1. copies the notebook into a temp folder with a longer ``duration_s`` (20 s; the CI default of 4 s is
   over before the charts have much to show), so the repository's notebook is not touched;
2. starts ``jupyter lab`` from the venv on a free loopback port with a random token, the project kernel
   ``rating-edge``, ``window.jupyterapp`` exposed, no browser, no news or update checks, and temp
   settings/workspace folders (so a user's own JupyterLab state neither leaks in nor is changed);
3. opens the notebook in headless Chromium (workbench/browser.py), waits for the kernel to be idle and
   runs all cells through JupyterLab's own command;
4. waits until the live dashboard's plotly FigureWidgets are drawn and their data grows (the run is
   some seconds in), scrolls to them and saves the PNG (default docs/jupyterlab-live.png);
5. lets the run finish (the static figures and the verdict appear: checked), then shuts JupyterLab down
   through its API, and kills by pid whatever of its process tree is left.

Usage: .venv/bin/python scripts/screenshot_lab.py [--out docs/jupyterlab-live.png] [--duration-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import psutil

from workbench.browser import Browser, BrowserError

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"

# Live charts = FigureWidgets drawn by plotly inside the notebook's output area.
LIVE_CHARTS_JS = ("[...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')]"
                  ".filter(d => d.querySelector('svg.main-svg')).length")
# A fingerprint of what the live charts draw: their line paths (FigureWidget data may travel as typed
# arrays, so the SVG, not gd.data, is what we read).  It changes while the run goes on.
DRAWN_JS = """[...document.querySelectorAll('.jp-OutputArea .js-plotly-plot .scatterlayer path.js-line')]
  .map(p => p.getAttribute('d') || '').join('|')"""
STATUS_JS = "((document.querySelector('.jp-OutputArea .widget-html') || {}).innerText || '')"
WIDGET_BOXES_JS = "document.querySelectorAll('.jp-OutputArea .widget-vbox').length"
KERNEL_IDLE_JS = """(() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(k && k.status === 'idle' && w.content && w.content.widgets && w.content.widgets.length > 0); })()"""
KERNEL_STATUS_JS = """(() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null; })()"""
# The run is over when the dashboard replaced itself with its verdict and static figures.
FINISHED_JS = """(() => { const t = document.querySelector('.jp-Notebook') ? document.querySelector('.jp-Notebook')
  .innerText : ''; return /every invariant held|FAILED|run failed/.test(t); })()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def notebook_copy(folder: Path, duration_s: float) -> Path:
    """The quickstart notebook with a longer run, in ``folder``; the parameters cell is edited, not replaced."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    # An absolute results folder: with the default (None: ./results, relative) the nodes resolve their
    # audit folder against their config file's folder, so the checker finds no audit events and reports
    # token loss (a workbench bug, reported; papermill runs pass absolute folders and do not meet it).
    edits = {"duration_s": f"{duration_s:g}  # long enough to watch the live charts",
             "results_dir": f"{str(folder / 'results')!r}  # absolute: see scripts/screenshot_lab.py"}
    lines = cell.source.splitlines()
    for name, value in edits.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{name} =")]
        if not at:
            raise SystemExit(f"the quickstart notebook has no {name} parameter any more")
        lines[at[0]] = f"{name} = {value}"
    cell.source = "\n".join(lines)
    dst = folder / NOTEBOOK.name
    nbformat.write(nb, dst)
    return dst


def lab_settings(folder: Path) -> dict[str, str]:
    """Temp JupyterLab user settings: no news or update toasts over the screenshot; its env vars."""
    settings = folder / "lab-settings"
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")
    (folder / "lab-workspaces").mkdir()
    (folder / "runtime").mkdir()
    return {"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(folder / "lab-workspaces"),
            "JUPYTER_RUNTIME_DIR": str(folder / "runtime")}


class Lab:
    """``jupyter lab`` on loopback, with a token; :meth:`stop` ends it and every process it started."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root.parent / "jupyterlab.log"
        cmd = [str(VENV_BIN / "jupyter"), "lab", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
               "--LabApp.expose_app_in_browser=True", "--MappingKernelManager.default_kernel_name=rating-edge",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]  # no PyPI look-ups from the extension manager
        if os.geteuid() == 0:  # CI and these machines run as root; JupyterLab refuses without this
            cmd.append("--allow-root")
        full_env = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        full_env.pop("WORKBENCH_HEADLESS", None)  # live widgets wanted here
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._tree: dict[int, psutil.Process] = {}

    def remember_children(self) -> None:
        """Note every process under the server (kernels live in sessions of their own, drill nodes under them)."""
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._tree[p.pid] = p

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"jupyter lab exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                req = urllib.request.Request(f"{self.base}/api/status",
                                             headers={"Authorization": f"token {self.token}"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"jupyter lab not ready in {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Shut the server down through its API (it shuts its kernels down), then kill what is left by pid."""
        self.remember_children()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST", data=b"",
                                             headers={"Authorization": f"token {self.token}"})
                urllib.request.urlopen(req, timeout=5).close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
        left = [p for p in self._tree.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _gone, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if left:
            print(f"ended {len(left)} leftover process(es) of JupyterLab by pid: {[p.pid for p in left]}")


async def drive(lab: Lab, notebook: str, out: Path, final: Path | None, width: int, height: int,
                duration_s: float, trace: Path | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    async with Browser(width=width, height=height) as b:
        await b.open(f"{lab.base}/lab/tree/{notebook}?reset&token={lab.token}", timeout_s=60)
        await b.wait_for(KERNEL_IDLE_JS, timeout_s=90, poll_s=0.25)
        lab.remember_children()
        # More room for the notebook: close the file browser; a plain single-document view.
        await b.evaluate("window.jupyterapp.shell.collapseLeft(); window.jupyterapp.shell.collapseRight(); true")
        t_run = time.monotonic()
        # Not awaited: the command's promise resolves only when every cell has run.
        await b.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells'); true")
        if trace is not None:  # a picture every 2 s, to see what the page went through
            for i in range(int((duration_s + 20) / 2)):
                await b.screenshot(trace / f"t{i * 2:03d}.png")
                charts, boxes = await b.evaluate(f"[{LIVE_CHARTS_JS}, {WIDGET_BOXES_JS}]")
                print(f"{time.monotonic() - t_run:5.1f} s: {charts} charts drawn, {boxes} widget boxes")
                await asyncio.sleep(2)
        await b.wait_for(f"{LIVE_CHARTS_JS} >= 5", timeout_s=60, poll_s=0.25)
        facts["charts_drawn_after_s"] = round(time.monotonic() - t_run, 1)
        lab.remember_children()
        # Mid-run: about half of the run left (the status line says "N s left").
        await b.wait_for(f"(() => {{ const m = /([0-9.]+) s left/.exec({STATUS_JS}); "
                         f"return m && parseFloat(m[1]) <= {duration_s * 0.5}; }})()", timeout_s=duration_s + 30,
                         poll_s=0.2)
        # "Updating": what the charts draw must change while the run goes on.
        before = await b.evaluate(DRAWN_JS)
        await asyncio.sleep(1.5)
        after = await b.evaluate(DRAWN_JS)
        if after == before:
            await b.screenshot(out.with_name(out.stem + "-debug.png"))
            raise BrowserError(f"the live charts did not change in 1.5 s (drawn path data: {len(before)} chars)")
        facts["drawn_path_chars_before_after"] = [len(before), len(after)]
        facts["live_charts"] = await b.evaluate(LIVE_CHARTS_JS)
        # Scroll so the running cell (its code, the progress bar, Stop, status, node table, charts) fills the view.
        await b.evaluate("""(() => { const box = document.querySelector('.jp-OutputArea .widget-vbox');
            box.closest('.jp-Cell').scrollIntoView({block: 'start'}); return true; })()""")
        await asyncio.sleep(0.6)  # the next chart update lands after the scroll
        status = await b.evaluate(STATUS_JS)
        facts["status_line"] = status.strip()[:200]
        facts["screenshot_at_s"] = round(time.monotonic() - t_run, 1)
        await b.screenshot(out)
        print(f"live screenshot {out} at {facts['screenshot_at_s']} s into the run "
              f"({facts['live_charts']} live charts; status: {facts['status_line']!r})")
        # Let the run finish: the dashboard leaves its verdict and static figures.
        await b.wait_for(FINISHED_JS, timeout_s=duration_s + 90, poll_s=0.5)
        await b.wait_for(f"{KERNEL_STATUS_JS} === 'idle'", timeout_s=60, poll_s=0.5)
        facts["finished_after_s"] = round(time.monotonic() - t_run, 1)
        facts["static_charts_after_run"] = await b.evaluate(LIVE_CHARTS_JS)
        if final is not None:
            await b.screenshot(final)
        facts["page_errors"] = b.console[:5]
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "jupyterlab-live.png"))
    ap.add_argument("--final", help="also save a screenshot after the run finished here")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--trace", help="debugging: a screenshot every 2 s of the run into this folder")
    ap.add_argument("--keep", action="store_true", help="debugging: keep the temp folder (notebook, results, log)")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1400)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wb-lab-"))
    root = tmp / "notebooks"
    root.mkdir()
    lab: Lab | None = None
    try:
        nb = notebook_copy(root, args.duration_s)
        lab = Lab(root, lab_settings(tmp))
        lab.wait_ready()
        facts = asyncio.run(drive(lab, nb.name, Path(args.out), Path(args.final) if args.final else None,
                                  args.width, args.height, args.duration_s,
                                  Path(args.trace) if args.trace else None))
        for summary in sorted((root / "results").glob("*/summary.json")):  # the run's own verdict
            data = json.loads(summary.read_text(encoding="utf-8"))
            facts["run_verdict"] = {k: data.get(k) for k in ("invariants_ok", "reasons", "generator_lag_p99_ms",
                                                             "client_errors", "throughput_rps")}
        print(json.dumps(facts, indent=2))
        return 0
    except BrowserError as exc:
        print(f"screenshot_lab: {exc}", file=sys.stderr)
        if lab is not None:
            print(lab.log_tail(), file=sys.stderr)
        return 1
    finally:
        if lab is not None:
            lab.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
