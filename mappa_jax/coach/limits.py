"""Async token bucket for requests-per-minute and tokens-per-minute limits."""
from __future__ import annotations

import asyncio
import time


class AsyncTokenBucket:
    """`per_minute` units refill continuously; bursts up to `burst_s` seconds' worth.

    rate 0 disables the limit. A single request larger than the capacity is let through once the
    bucket is full (the balance goes negative) instead of waiting forever. Waiters are served in
    order (one lock), so a big request is not starved by small ones.
    """

    def __init__(self, per_minute: float, *, burst_s: float = 10.0, clock=time.monotonic):
        self.per_minute = float(per_minute)
        self.capacity = float(per_minute) * burst_s / 60.0
        self._rate = float(per_minute) / 60.0
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time callers spent waiting: shows when the limit binds

    def rebind(self) -> None:
        """A fresh lock for a new event loop (the level carries over)."""
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self._rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        if not self.enabled:
            return
        async with self._lock:
            need = min(float(amount), self.capacity)
            while True:
                self._refill()
                if self._level >= need:
                    self._level -= float(amount)
                    return
                wait = (need - self._level) / self._rate
                self.waited_s += wait
                await asyncio.sleep(wait)

    def adjust(self, amount: float) -> None:
        """Charge (or refund, if negative) the difference between estimated and actual usage."""
        if self.enabled:
            self._refill()
            self._level = min(self.capacity, self._level - float(amount))
