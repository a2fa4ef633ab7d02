"""Which install brings which module, so a command that lacks one says what to install in one line.

``pip install rating-edge-workbench`` brings everything ``workbench run``, ``workbench report`` and
the notebooks' kernels need; JupyterLab, Voila (``workbench dashboard``) and nbval come with the
``notebooks`` extra.  The CLI turns a ``ModuleNotFoundError`` into :func:`missing_message` and exit 2
instead of a traceback.
"""

from __future__ import annotations

__all__ = ["EXTRA_OF", "missing_message"]

PACKAGE = "rating-edge-workbench"
# top-level module -> the extra that installs it (None: the base install)
EXTRA_OF: dict[str, str | None] = {
    "voila": "notebooks", "jupyterlab": "notebooks", "nbval": "notebooks", "kaleido": "notebooks",
    "papermill": None, "nbformat": None, "nbconvert": None, "nbclient": None, "ipykernel": None,
    "ipywidgets": None, "anywidget": None, "plotly": None, "jupyter_client": None, "hdrh": None,
    "aiohttp": None, "psutil": None, "yaml": None, "orjson": None,
}


def missing_message(command: str, exc: ModuleNotFoundError) -> str:
    """One line: which module is missing and the pip command that installs it."""
    module = (exc.name or str(exc)).split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is not None:
        return (f"workbench {command}: needs {module}, from the '{extra}' extra: "
                f"pip install '{PACKAGE}[{extra}]'")
    if module in EXTRA_OF:
        return (f"workbench {command}: needs {module}, which the base install brings; the install is "
                f"incomplete: pip install --force-reinstall {PACKAGE}")
    return f"workbench {command}: a module is missing: {module} (pip install '{PACKAGE}[notebooks]')"
