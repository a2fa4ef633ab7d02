"""The invoke route's commit protocol: the router may retry a skill call on another region exactly as
long as no node has been given its body.  ``docs/router.md`` ("A skill call is committed once") is the
long form.

A skill call is not idempotent, so the router may send it elsewhere only when the first node certainly
did nothing with it.  HTTP/1.1 already has the handshake for that, ``Expect: 100-continue`` (RFC 9110,
10.1.1), used here as a two-phase commit:

1. The router sends the request's headers with ``Expect: 100-continue`` and holds the body back.
2. A node that has admitted the request (past its deadline check and its gate) answers
   ``100 Continue`` at once: an interim response, before it reads the body, decides or calls the skill.
3. The router sends the body to the **first** of its tries whose ``100 Continue`` arrives
   (:class:`Claim`); every other try is cancelled, its connection closed with the body unsent.
4. The node reads the body, then decides (tokens) and calls the skill, and answers as always.

So a try without its ``100 Continue`` (refused, reset or closed before it, or none within the router's
``invoke_header_timeout_ms``) has spent no token and called no skill, and is retried (or hedged) on the
next region; a try that got the body is never retried.  A node drops what it can no longer answer:
a body that never comes (the router chose another try, or gave up), a connection closed before the
decision or before the skill call; and counts a skill call whose caller was gone when it returned.

No machinery of its own: the router's side is an aiohttp request payload that claims the request when
aiohttp, on the ``100 Continue``, starts to write it; the node's side writes the interim response as
aiohttp's own expect handler does, and looks at its transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import payload, web

__all__ = ["CONTINUE", "Abandoned", "Claim", "CommitPayload", "client_gone", "send_continue"]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Abandoned(Exception):
    """This try's ``100 Continue`` came after another try of the request had got the body."""


class Claim:
    """Which try of one request got its body: the first to claim it, never two.  ``on_claim`` runs
    once, in the claiming try's writer, before its body is written (the router cancels the others)."""

    __slots__ = ("at", "holder", "on_claim")

    def __init__(self, on_claim: Callable[[Any], None]) -> None:
        self.holder: Any = None  # the try (the router's task) that got the body
        self.at = 0.0  # perf_counter at the claim
        self.on_claim = on_claim

    def take(self, owner: Any) -> bool:
        if self.holder is not None:
            return self.holder is owner
        self.holder, self.at = owner, time.perf_counter()
        self.on_claim(owner)
        return True


class CommitPayload(payload.BytesPayload):
    """The request body of one try, written only if the try wins the :class:`Claim`.  aiohttp writes a
    request body that expects ``100 Continue`` only after that interim response came, so the claim
    happens exactly then; ``owner`` is set by the router once the try's task exists."""

    def __init__(self, value: bytes, claim: Claim, content_type: str | None) -> None:
        super().__init__(value, content_type=content_type or "application/json")
        self.claim = claim
        self.owner: Any = None

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        if not self.claim.take(self.owner):
            raise Abandoned("another try of this request was given its body first")
        await super().write_with_length(writer, content_length)


async def send_continue(request: web.BaseRequest) -> bool:
    """Answer ``100 Continue`` (as aiohttp's own expect handler does): the node has admitted the
    request and will read its body.  False when the connection is already closed (the router gave
    the call to another region, or gave up, while this node was paused or blackholed)."""
    if client_gone(request):
        return False
    try:
        await request.writer.write(CONTINUE)
    except ConnectionError:  # aiohttp's ClientConnectionResetError: the transport closed under the write
        return False
    request.writer.output_size = 0  # the interim response is no part of the answer's size
    return True


def client_gone(request: web.BaseRequest) -> bool:
    """The connection the request came on is closed: whatever the node answers is never read."""
    transport = request.transport
    return transport is None or transport.is_closing()
