"""Token buckets keyed by source address: a peer (or anyone) flooding a node is slowed down,
never able to take it down, and logged once per interval rather than once per message.

Pure bookkeeping: every call takes the time (monotonic seconds) as an argument, so the tables
in tests/test_limits.py drive it without sleeping. The callers (the UDP probe socket in
cluster.links, the HTTP peer routes in api.cluster) own the clock and the log line.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

LOG_EVERY_S = 10.0  # at most one line per source per this long
MAX_SOURCES = 1024  # sources tracked at once; spoofed UDP sources must not grow memory


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; each message takes one."""

    rate: float
    burst: float
    tokens: float
    at: float  # when `tokens` was last brought up to date

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.at)  # a clock that steps back never mints tokens
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Verdict(NamedTuple):
    allowed: bool
    log_dropped: int  # > 0: say so now, with this many refused since the last line


@dataclass
class _Source:
    bucket: TokenBucket
    dropped_since_log: int = 0
    logged_at: float = float("-inf")


class RateLimiter:
    """One token bucket per source key (an address), the least recently seen forgotten first
    once `max_sources` are tracked (a forgotten source starts again with a full bucket)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        log_every: float = LOG_EVERY_S,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate > 0, burst >= 1 and max_sources >= 1")
        self.rate, self.burst = rate, burst
        self.log_every, self.max_sources = log_every, max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self.dropped = 0  # refused in all, for tests and metrics

    def __len__(self) -> int:
        return len(self._sources)

    def allow(self, key: str, now: float) -> Verdict:
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source(TokenBucket.full(self.rate, self.burst, now))
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        if source.bucket.take(now):
            return Verdict(True, 0)
        self.dropped += 1
        source.dropped_since_log += 1
        if now - source.logged_at < self.log_every:
            return Verdict(False, 0)
        count, source.dropped_since_log, source.logged_at = source.dropped_since_log, 0, now
        return Verdict(False, count)
