"""The centralized design users run today: an aiohttp app whose token bucket lives in Redis.

Every POST /v1/limits/check {"key", "cost"} runs one atomic Lua script (EVALSHA through redis-py's
``Script``, which loads it on a NOSCRIPT) over a redis.asyncio connection pool -- the shape of envoy's
ratelimit service or Kong's ``redis`` policy.  Time comes from Redis (``TIME``) so every app replica
shares one clock.  When Redis errors or does not answer within ``--redis-timeout-ms`` the app either
fails open (admits, ``"degraded": true``) or fails closed (503 ``limiter_unavailable``), as chosen
with ``--fail``.

Usage: .venv/bin/python benchmarks/redis_limiter_app.py --port P --redis-port RP --rate R --burst B
       [--fail open|closed] [--redis-timeout-ms 250] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

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


def build_app(redis_port: int, rate: float, burst: float, fail: str, timeout_s: float) -> web.Application:
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_port, socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s, max_connections=512)
    client = aioredis.Redis(connection_pool=pool)
    script = client.register_script(TOKEN_BUCKET_LUA)
    counters = {"allowed": 0, "denied": 0, "redis_errors": 0}

    async def check(request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
            key = doc["key"]
            cost = int(doc.get("cost", 1))
            if not isinstance(key, str) or cost < 1:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": {"code": "bad_request", "message": "key and cost", "field": "key"}},
                                     status=400)
        rid = uuid.uuid4().hex
        try:
            # socket_timeout bounds a Redis that does not answer (SIGSTOP): no wait_for task per request
            allowed, level, retry = await script(keys=[f"rl:{key}"], args=[rate, burst, cost])
        except (RedisError, OSError, TimeoutError) as exc:
            counters["redis_errors"] += 1
            if fail == "open":
                counters["allowed"] += 1
                return web.json_response({"allowed": True, "remaining": None, "limit": burst, "retry_after_ms": 0,
                                          "request_id": rid, "degraded": True})
            return web.json_response({"error": {"code": "limiter_unavailable", "message": type(exc).__name__,
                                                "field": None}}, status=503)
        counters["allowed" if allowed else "denied"] += 1
        return web.json_response({"allowed": bool(allowed), "remaining": float(level), "limit": burst,
                                  "retry_after_ms": int(retry), "request_id": rid})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True, **counters})

    async def close(app: web.Application) -> None:
        await client.aclose()

    app = web.Application()
    app.router.add_post("/v1/limits/check", check)
    app.router.add_get("/readyz", ready)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="token bucket in Redis behind aiohttp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--burst", type=float, required=True)
    parser.add_argument("--fail", choices=("open", "closed"), default="open")
    parser.add_argument("--redis-timeout-ms", type=float, default=250.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = build_app(args.redis_port, args.rate, args.burst, args.fail, args.redis_timeout_ms / 1000)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
