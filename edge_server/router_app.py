"""The router's aiohttp application: its routes, the JSON error middleware, and the cleanup context that
owns the forwarding pool, the health-checker thread, the loop-lag watch and the adaptive limit.  The
routing itself is :class:`edge_server.router.Router`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from edge_server.config import NodeSpec
from edge_server.router import Router, error_response
from edge_server.router_health import CheckResult, HealthChecker

__all__ = ["ROUTER", "build_router_app"]

log = logging.getLogger("edge_server.router")

ROUTER: web.AppKey[Router] = web.AppKey("router", Router)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every router-made error is JSON in the node's shape, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        message = "no such route" if exc.status == 404 else exc.reason
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                              f"{message}: {request.method} {request.path}")
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal router error")


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[ROUTER].handle(request)


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROUTER].state())


async def _healthz(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    return web.json_response({"status": "ok", "node": "router", "routing": router.routing()})


async def _metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    router.refresh_gauges()
    return web.Response(body=router.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


def build_router_app(router: Router) -> web.Application:
    """The router's aiohttp app; its cleanup context owns the forwarding pool, the checker thread and
    the loop-lag watch."""
    app = web.Application(middlewares=[_errors], client_max_size=router.config.server.max_body_bytes + 1)
    app[ROUTER] = router

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        rc = router.rc
        router.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=rc.connections_per_node, keepalive_timeout=30),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        loop = asyncio.get_running_loop()
        first_round = asyncio.Event()

        def deliver(spec: NodeSpec, result: CheckResult) -> None:  # runs in the checker thread
            with contextlib.suppress(RuntimeError):  # the main loop is closing
                loop.call_soon_threadsafe(_apply, spec, result)

        def _apply(spec: NodeSpec, result: CheckResult) -> None:
            router.apply_check(router.nodes[spec.id], result)
            if all(n.checks for n in router.nodes.values()):
                first_round.set()

        checker = HealthChecker(list(router.config.nodes), rc, deliver)
        checker.start()
        router.probe = checker.check_soon
        # One round of checks before serving, so the first requests already have somewhere to go.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rc.health_timeout_ms / 1000 + rc.health_interval_ms / 1000 + 1):
                await first_round.wait()
        lag = asyncio.create_task(router.watch_loop_lag(), name="router-loop-lag")
        adaptive = router.adaptive and asyncio.create_task(router.adaptive.run(), name="router-adaptive-limit")
        try:
            yield
        finally:
            for task in (lag, adaptive):
                if task:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await router.hedges.close()
            await loop.run_in_executor(None, checker.stop)
            await router.session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/router/state", _state)
    app.router.add_route("*", "/v1/{tail:.*}", _proxy)
    return app
