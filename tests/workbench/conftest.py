"""Fixtures shared by the workbench's fault tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.echo import echo_handler


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A loopback echo server's port, closed after the test."""
    server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
