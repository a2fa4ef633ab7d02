"""A TCP echo handler for fault-proxy tests: what goes in comes back, until the peer closes."""

from __future__ import annotations

import asyncio

__all__ = ["echo_handler"]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
