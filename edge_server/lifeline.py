"""Die with the process that started this one, when it asks to.

A workbench (or a benchmark) that is itself killed with ``kill -9`` cannot reap its nodes, and nodes
that outlive it keep serving on their ports.  A parent that sets ``EDGE_DIE_WITH_PARENT`` to its own
pid gets its children killed by the kernel when it goes (Linux ``PR_SET_PDEATHSIG``).  The kernel
watches the *thread* that started the child, so start nodes from a thread that lives as long as they
should (the event loop's).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["ENV", "die_with_parent"]

ENV = "EDGE_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent(environ: dict[str, str] | None = None) -> bool:
    """Arrange SIGKILL on the parent's death if ``EDGE_DIE_WITH_PARENT`` names it; True if armed.

    If that parent is already gone (it died before this ran), exit at once.
    """
    raw = (os.environ if environ is None else environ).get(ENV, "")
    if not raw.isdigit() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(raw):  # reparented already: the parent died before the call above
        os._exit(1)
    return True
