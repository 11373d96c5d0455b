"""Per-key request rates: the generic cell rate algorithm (GCRA), in Redis or in memory.

A key allowed `rate` requests a minute may send one every 60/rate seconds, and a burst of
up to `rate` at once after a quiet minute. The state is one number per key, the
theoretical arrival time (TAT) of its next request: a request at `now` is allowed when
`TAT - burst_window <= now`, and moves TAT on by one interval. Every API process that
shares a Redis shares the counts (the update is one Lua script, so it is atomic, and
uses Redis's clock, so the processes' clocks do not matter); the embedded default, one
API process, keeps them in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

logger = logging.getLogger("genserve.api")

WINDOW_S = 60.0

# KEYS[1]: the key's TAT; ARGV: interval and burst window, in microseconds.
# Returns 0 when allowed, else the microseconds to wait.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - window - now
if wait > 0 then return wait end
local new_tat = tat + interval
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
return 0
"""


class RateLimiter(Protocol):
    def acquire(self, key: str, rate_per_minute: int) -> float:
        """0 when a request is allowed (and counted), else the seconds until it would be."""
        ...

    def close(self) -> None: ...


def _interval_and_window(rate_per_minute: int) -> tuple[float, float]:
    interval = WINDOW_S / rate_per_minute
    return interval, interval * (rate_per_minute - 1)


class LocalRateLimiter:
    """For one API process: the TATs in a dict, under a lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def acquire(self, key: str, rate_per_minute: int) -> float:
        interval, window = _interval_and_window(rate_per_minute)
        with self._lock:
            now = self._clock()
            tat = max(self._tats.get(key, now), now)
            wait = tat - window - now
            if wait > 0:
                return wait
            self._tats[key] = tat + interval
            if len(self._tats) > 100_000:
                self._forget_idle(now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        # A TAT in the past is the same as no TAT: drop those.
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}

    def close(self) -> None:
        self._tats.clear()


class RedisRateLimiter:
    """For API processes that share a Redis. If Redis fails, requests are let through
    (and logged): a limiter must not take the API down with it."""

    def __init__(self, url: str, *, prefix: str = "genserve:rate:") -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._client.register_script(_GCRA)
        self._prefix = prefix

    def acquire(self, key: str, rate_per_minute: int) -> float:
        interval, window = _interval_and_window(rate_per_minute)
        try:
            wait_us = self._script(
                keys=[self._prefix + key], args=[int(interval * 1e6), int(window * 1e6)]
            )
        except redis.RedisError as exc:
            logger.warning("rate limiter unavailable, letting the request through: %s", exc)
            return 0.0
        return int(wait_us) / 1e6

    def close(self) -> None:
        self._client.close()


def make_rate_limiter(events_url: str) -> LocalRateLimiter | RedisRateLimiter:
    """Redis when the processes share one (the events backend), else in memory."""
    if events_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(events_url)
    return LocalRateLimiter()


def effective_rate(*limits: int | None) -> int | None:
    """The strictest of the limits that are set (None or 0: not set); None is unlimited."""
    set_limits = [limit for limit in limits if limit]
    return min(set_limits) if set_limits else None
