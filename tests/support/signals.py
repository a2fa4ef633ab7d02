"""Signal dispositions for child processes that a test interrupts."""

from __future__ import annotations

import signal

__all__ = ["interruptible"]


def interruptible() -> None:
    """``preexec_fn`` for a child the test sends SIGINT (a Ctrl-C).

    A test run started in the background by a shell without job control (``cmd &`` in a script)
    inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt handler: the child would
    never see the Ctrl-C the test is about.  Measured: both Ctrl-C tests ran their drill to the end and
    timed out that way.  The child starts with the default disposition, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
