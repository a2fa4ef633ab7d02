"""What a simulated node process shares, eventual or strict: SIGSTOP / SIGCONT on virtual time.

A paused process holds every event addressed to it (``held``) and runs them in order on resume, unless
it was killed meanwhile: ``inc`` (its incarnation) moves on at every start, and events of an earlier
incarnation are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PausableProcess"]


class PausableProcess:
    """Pause and resume for a simulated node; the subclass sets ``state``, ``inc`` and ``held``."""

    state: str  # up, paused, down
    inc: int
    held: list[tuple[Callable[..., Any], tuple[Any, ...]]]

    def pause(self) -> None:
        if self.state == "up":
            self.state = "paused"

    def resume(self) -> None:
        if self.state != "paused":
            return
        self.state = "up"
        held, self.held = self.held, []
        inc = self.inc
        for fn, args in held:
            if inc != self.inc or self.state != "up":
                break
            fn(*args)
