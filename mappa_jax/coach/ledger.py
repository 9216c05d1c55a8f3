"""Counts of what the coach did and what it cost, for logging and for honest metrics."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

# USD per million tokens (input, output) at list price for prompts <= 200k tokens, late 2025.
# Unknown models cost 0 and are listed in metrics()["unpriced_models"].
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.0-flash": (0.10, 0.40),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


def price_of(model: str, table: dict[str, tuple[float, float]] | None = None) -> tuple[float, float] | None:
    table = PRICES_PER_MTOK if table is None else table
    if model in table:
        return table[model]
    # Versioned names ("gemini-2.5-flash-001", "models/gemini-2.5-pro") price like their family.
    name = model.rsplit("/", 1)[-1]
    for known in sorted(table, key=len, reverse=True):
        if name.startswith(known):
            return table[known]
    return None


@dataclasses.dataclass
class Ledger:
    requests: int = 0
    ok: int = 0
    fallbacks: int = 0
    fallbacks_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    calls: int = 0            # backend calls made, including retries and repairs
    retries: int = 0          # extra calls after retryable errors
    retries_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    repairs: int = 0          # format-repair calls
    cache_hits: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    rate_limit_wait_s: float = 0.0
    unpriced_models: set = dataclasses.field(default_factory=set)
    latencies_s: list = dataclasses.field(default_factory=list)  # per judged (not cached) request

    def metrics(self) -> dict:
        lat = np.asarray(self.latencies_s, dtype=np.float64)
        pct = (np.percentile(lat, [50, 90, 99]) if lat.size else np.full(3, np.nan)).tolist()
        out = {
            "requests": self.requests, "ok": self.ok, "fallbacks": self.fallbacks,
            "fallback_rate": self.fallbacks / self.requests if self.requests else 0.0,
            "calls": self.calls, "retries": self.retries, "repairs": self.repairs,
            "cache_hits": self.cache_hits, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
            "cost_usd": self.cost_usd, "rate_limit_wait_s": self.rate_limit_wait_s,
            "latency_p50_s": pct[0], "latency_p90_s": pct[1], "latency_p99_s": pct[2],
            "unpriced_models": sorted(self.unpriced_models),
        }
        out.update({f"fallbacks/{k}": v for k, v in sorted(self.fallbacks_by_reason.items())})
        out.update({f"retries/{k}": v for k, v in sorted(self.retries_by_reason.items())})
        return out
