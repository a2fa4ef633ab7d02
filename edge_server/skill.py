"""The skill behind the edge: a simulated LLM-backed rater, or a real upstream URL.

The simulated skill draws its latency from a lognormal distribution fitted to a median and a 99th
percentile (LLM calls are long-tailed), can burn CPU and fail at a given rate, and computes a
deterministic rating from the request body so callers can check they got *their* answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from typing import Any

import aiohttp

from edge_server.config import SkillConfig

__all__ = ["SimulatedSkill", "Skill", "SkillError", "UpstreamSkill", "make_skill", "rate_text"]

Z99 = 2.3263478740408408  # standard normal quantile of 0.99


class SkillError(Exception):
    """The skill failed; the edge answers 502 with this message (tokens stay spent and audited)."""


def rate_text(body: Any) -> dict[str, Any]:
    """A deterministic 'rating' of a request body: score 1-5 and a confidence, from its hash."""
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    # surrogatepass: a JSON body may carry lone surrogates; the rating must not fail after the grant.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    return {"score": 1 + value % 5, "confidence": round((value >> 8) % 1000 / 1000, 3), "chars": len(text)}


class Skill:
    name: str

    async def invoke(self, body: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


class SimulatedSkill(Skill):
    def __init__(self, config: SkillConfig, seed: int | None = None) -> None:
        self.name = config.name
        self.config = config
        self._rng = random.Random(seed)
        self._mu = math.log(config.median_ms / 1000) if config.median_ms > 0 else None
        ratio = config.p99_ms / config.median_ms if config.median_ms > 0 else 1.0
        self._sigma = math.log(ratio) / Z99 if ratio > 1 else 0.0

    def latency_s(self) -> float:
        if self._mu is None:
            return 0.0
        return math.exp(self._rng.gauss(self._mu, self._sigma)) if self._sigma else math.exp(self._mu)

    async def invoke(self, body: Any) -> dict[str, Any]:
        delay = self.latency_s()
        if self.config.cpu_us > 0:
            end = time.perf_counter() + self.config.cpu_us / 1e6
            while time.perf_counter() < end:
                pass
        if delay > 0:
            await asyncio.sleep(delay)
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            raise SkillError("simulated skill failure")
        return {"rating": rate_text(body), "latency_ms": round(delay * 1000, 3)}


class UpstreamSkill(Skill):
    """Proxies the JSON body to a real URL; any failure or non-2xx becomes a :class:`SkillError`."""

    def __init__(self, config: SkillConfig) -> None:
        self.name = config.name
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def invoke(self, body: Any) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_ms / 1000))
        try:
            async with self._session.post(self.config.url, json=body) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise SkillError(f"upstream answered {resp.status}")
                try:
                    return {"upstream": json.loads(text)}
                except ValueError:
                    return {"upstream": text}
        except TimeoutError:
            raise SkillError(f"upstream timed out after {self.config.timeout_ms:g} ms") from None
        except aiohttp.ClientError as exc:
            raise SkillError(f"upstream unreachable: {exc.__class__.__name__}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_skill(config: SkillConfig) -> Skill:
    return UpstreamSkill(config) if config.kind == "upstream" else SimulatedSkill(config)
