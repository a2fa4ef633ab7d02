"""The centralized design users run today, written with the same care as our node: a token bucket in Redis.

Every POST /v1/limits/check {"key", "cost"} runs one atomic Lua script (EVALSHA; loaded once at start,
reloaded on NOSCRIPT) -- the shape of envoy's ratelimit service or Kong's ``redis`` policy.  The app is
built like the node's hot path so the comparison measures the design, not the code: aiohttp's low-level
``web.Server`` with one handler, orjson, uvloop, ``gc.freeze()``, request ids from a counter, redis-py with
the hiredis parser when installed, and a connection pool sized to the load tool's connections
(``--pool``; a pool smaller than the concurrency would queue requests inside the app).  Time comes from
Redis (``TIME``) so every app replica shares one clock.

``--sentinel HOST:PORT`` follows a replicated Redis (primary + replica + Sentinel) through
``redis.asyncio.sentinel.Sentinel``: after a failover the pool reconnects to the new primary.  When Redis
errors or does not answer within ``--redis-timeout-ms`` the app fails open (admits, ``"degraded": true``)
or closed (503 ``limiter_unavailable``), as chosen with ``--fail``.

Usage: .venv/bin/python benchmarks/redis_limiter_app.py --port P (--redis-port RP | --sentinel H:P)
       --rate R --burst B [--pool 64] [--fail open|closed] [--redis-timeout-ms 250] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import NoScriptError, RedisError

try:  # the C parser: what a careful deployment installs
    import hiredis  # noqa: F401

    PARSER = "hiredis"
except ImportError:  # pragma: no cover - declared in the dev extra
    PARSER = "python"

# KEYS[1] bucket; ARGV rate, burst, cost -> {allowed 0/1, level as string, retry_after_ms}
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'l', 't')
local level = tonumber(v[1])
local last = tonumber(v[2])
if level == nil then level = burst; last = now end
level = math.min(burst, level + math.max(0, now - last) * rate)
local allowed = 0
local retry = 0
if level >= cost then
  level = level - cost
  allowed = 1
else
  retry = math.ceil((cost - level) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'l', level, 't', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(level), retry}
"""

JSON_HEADERS = {"Content-Type": "application/json"}
CHECK_PATH = "/v1/limits/check"


def _error(status: int, code: str, message: str, field: str | None) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "field": field}})
    return web.Response(status=status, body=body, headers=JSON_HEADERS)


class RedisLimiter:
    """The handler and its state: one client, the script's sha, counters for /readyz."""

    def __init__(self, client: aioredis.Redis, rate: float, burst: float, fail: str) -> None:
        self.client, self.rate, self.burst, self.fail = client, rate, burst, fail
        self.sha = ""
        self.counters = {"allowed": 0, "denied": 0, "redis_errors": 0}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex() + "-"

    async def load_script(self) -> None:
        self.sha = await self.client.script_load(TOKEN_BUCKET_LUA)

    async def _eval(self, key: str, cost: int) -> list:
        try:
            return await self.client.evalsha(self.sha, 1, "rl:" + key, self.rate, self.burst, cost)
        except NoScriptError:  # a restarted or failed-over Redis lost its script cache
            await self.load_script()
            return await self.client.evalsha(self.sha, 1, "rl:" + key, self.rate, self.burst, cost)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/readyz":
            return web.Response(body=orjson.dumps({"ready": bool(self.sha), "parser": PARSER, **self.counters}),
                                headers=JSON_HEADERS)
        if request.path != CHECK_PATH or request.method != "POST":
            return _error(404, "not_found", "POST /v1/limits/check only", None)
        try:
            doc = orjson.loads(await request.read())
            key, cost = doc["key"], doc.get("cost", 1)
            if not isinstance(key, str) or not key or not isinstance(cost, int) or cost < 1:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _error(400, "bad_request", "body must be {\"key\": str, \"cost\": int >= 1}", "key")
        rid = self._prefix + str(next(self._ids))
        try:
            allowed, level, retry = await self._eval(key, cost)
        except (RedisError, OSError, TimeoutError) as exc:
            self.counters["redis_errors"] += 1
            if self.fail == "open":
                self.counters["allowed"] += 1
                return web.Response(body=orjson.dumps({"allowed": True, "remaining": None, "limit": self.burst,
                                                       "retry_after_ms": 0, "request_id": rid,
                                                       "degraded": True}), headers=JSON_HEADERS)
            return _error(503, "limiter_unavailable", type(exc).__name__, None)
        self.counters["allowed" if allowed else "denied"] += 1
        return web.Response(body=orjson.dumps({"allowed": bool(allowed), "remaining": float(level),
                                               "limit": self.burst, "retry_after_ms": int(retry),
                                               "request_id": rid}), headers=JSON_HEADERS)


def make_client(args: argparse.Namespace) -> aioredis.Redis:
    timeout = args.redis_timeout_ms / 1000
    if args.sentinel:
        from redis.asyncio.sentinel import Sentinel

        host, _, port = args.sentinel.rpartition(":")
        sentinel = Sentinel([(host or "127.0.0.1", int(port))], socket_timeout=timeout,
                            socket_connect_timeout=timeout)
        return sentinel.master_for(args.master_name, socket_timeout=timeout, socket_connect_timeout=timeout,
                                   max_connections=args.pool)
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=args.redis_port, socket_timeout=timeout,
                                   socket_connect_timeout=timeout, max_connections=args.pool)
    return aioredis.Redis(connection_pool=pool)


async def serve(args: argparse.Namespace) -> None:
    client = make_client(args)
    limiter = RedisLimiter(client, args.rate, args.burst, args.fail)
    await limiter.load_script()
    runner = web.ServerRunner(web.Server(limiter.handle, access_log=None), handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True, backlog=4096)
    await site.start()
    gc.collect()
    gc.freeze()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="token bucket in Redis behind aiohttp (the fair baseline)")
    parser.add_argument("--port", type=int, required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--redis-port", type=int)
    where.add_argument("--sentinel", help="HOST:PORT of a Sentinel that watches the primary")
    parser.add_argument("--master-name", default="edge", help="the Sentinel's name of the primary")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--burst", type=float, required=True)
    parser.add_argument("--pool", type=int, default=64, help="Redis connections: size it to the load's connections")
    parser.add_argument("--fail", choices=("open", "closed"), default="open")
    parser.add_argument("--redis-timeout-ms", type=float, default=250.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
