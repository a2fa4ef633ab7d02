"""The skill behind the edge: a simulated LLM-backed rater, or a real upstream URL.

The simulated skill draws its latency from a lognormal distribution fitted to a median and a 99th
percentile (LLM calls are long-tailed), can burn CPU and fail at a given rate, and computes a
deterministic rating from the request body so callers can check they got *their* answer.  With
``answer_bytes`` set, the answer also carries a chat-completion-shaped ``completion`` (id, model, one
assistant message, token usage) whose text pads the JSON body to about that size, because an edge in
front of an LLM spends its CPU serializing and relaying answers of a few kB, not 100 B.
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

__all__ = ["SimulatedSkill", "Skill", "SkillError", "UpstreamSkill", "completion", "make_skill", "rate_text"]

Z99 = 2.3263478740408408  # standard normal quantile of 0.99
# Words the simulated completion is cut from (built once: a call only slices it).
_WORDS = ("the rating reflects tone clarity and intent of the request with a summary of strengths weaknesses "
          "and a short recommendation for the reviewer who asked ").split()
_TEXT = " ".join(_WORDS[(i * 7) % len(_WORDS)] for i in range(40_000))


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
        rating = rate_text(body)
        answer: dict[str, Any] = {"rating": rating, "latency_ms": round(delay * 1000, 3)}
        if self.config.answer_bytes > 0:
            answer["completion"] = completion(rating, self.config.answer_bytes)
        return answer


def completion(rating: dict[str, Any], size: int) -> dict[str, Any]:
    """A chat-completion-shaped answer whose JSON is about ``size`` bytes (its text is ~``size`` - 290
    characters of ASCII words, cut at an offset chosen by the rating so answers differ)."""
    chars = max(0, min(size - 290, len(_TEXT) - 1))  # ~290 B of JSON around the text
    start = (rating["score"] * 7919 + int(rating["confidence"] * 1000)) % max(1, len(_TEXT) - chars)
    text = _TEXT[start:start + chars]
    words = text.count(" ") + 1
    return {"id": f"cmpl-{rating['score']}{int(rating['confidence'] * 1000):03d}", "model": "simulated-llm",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": rating["chars"] // 4 + 1, "completion_tokens": words,
                      "total_tokens": rating["chars"] // 4 + 1 + words}}


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
