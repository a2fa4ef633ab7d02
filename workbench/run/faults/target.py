"""Watching a relay's target for death and return, so the relay can refuse while the target does.

A connect straight to a killed process is refused at once; a relay that accepted first can only
reset the connection after the request went out, which a client must treat as "may have acted".
:class:`TargetWatch` tells its owner when the target's port refuses (``on_down``) and when it accepts
again (``on_up``), from probe connections: one series after any upstream connection closed under
the relay (a killed process closes its connections, then its listening socket, so the first probe
may still get in), and one every ``interval_s`` while the target is down.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from workbench.run.faults.listener import SocketFactory

__all__ = ["TargetWatch"]


class TargetWatch:
    """Probe ``address()`` on demand; call ``on_down`` / ``on_up`` as the target dies and returns."""

    def __init__(self, address: Callable[[], tuple[str, int]], on_down: Callable[[], None],
                 on_up: Callable[[], None], *, make_socket: SocketFactory | None = None,
                 interval_s: float = 0.02, probes_after_close: int = 5) -> None:
        self._address = address
        self._on_down = on_down
        self._on_up = on_up
        self._make_socket = make_socket
        self.interval_s = interval_s
        self.probes_after_close = probes_after_close
        self.down = False
        self._probing: asyncio.Task[None] | None = None  # probes after an upstream close
        self._watching: asyncio.Task[None] | None = None  # probes while the target is down

    def __repr__(self) -> str:
        host, port = self._address()
        return f"<TargetWatch {host}:{port} {'down' if self.down else 'up'}>"

    def refused(self) -> None:
        """The target refused a connection: it is down until a probe gets through."""
        if self.down:
            return
        self.down = True
        self._on_down()
        self._watching = _spawn(self._until_up())

    def suspect(self) -> None:
        """A connection to the target closed under us: probe a few times to tell death from a close."""
        if self.down or (self._probing is not None and not self._probing.done()):
            return
        self._probing = _spawn(self._a_while())

    def stop(self) -> None:
        for task in (self._probing, self._watching):
            if task is not None:
                task.cancel()
        self._probing = self._watching = None
        self.down = False

    async def _a_while(self) -> None:
        for i in range(self.probes_after_close):
            if i:
                await asyncio.sleep(self.interval_s)
            if not await self.accepts():
                self.refused()
                return

    async def _until_up(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if await self.accepts():
                break
        self.down = False
        self._on_up()

    async def accepts(self) -> bool:
        """False only when the target refuses a connection (a timeout or a success count as up)."""
        loop = asyncio.get_running_loop()
        sock = self._make_socket() if self._make_socket is not None else socket.socket()
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, self._address()), 1.0)
        except ConnectionRefusedError:
            return False
        except (OSError, TimeoutError):
            return True
        finally:
            sock.close()
        return True


def _spawn(coro: object) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    return task
