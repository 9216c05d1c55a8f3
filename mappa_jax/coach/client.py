"""CoachClient: the one object that turns CoachRequests into Verdicts.

It owns the concurrency limit, rate limits, per-call timeout, bounded retries with backoff and
jitter, one format-repair retry, the persistent cache and the ledger. A request always ends in a
Verdict: status "ok" with a score, or status "fallback" with a reason (never a neutral score).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Iterable

from mappa_jax.coach.backends.base import Backend
from mappa_jax.coach.cache import VerdictCache, cache_key
from mappa_jax.coach.ledger import Ledger, price_of
from mappa_jax.coach.limits import AsyncTokenBucket
from mappa_jax.coach.parsing import parse_verdict
from mappa_jax.coach.prompts import SCORE_SCHEMA, Prompt, build_prompt
from mappa_jax.coach.redaction import redact
from mappa_jax.coach.types import BackendError, CoachCredentialsError, CoachRequest, ParseError, RawResult, Verdict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 60.0      # per backend call
    max_retries: int = 4         # extra calls after retryable errors (429, 5xx, timeouts, drops)
    backoff_base_s: float = 1.0  # delay before retry k is base * 2**(k-1), jittered to [0.5x, 1x]
    backoff_max_s: float = 30.0
    format_repair: bool = True   # one extra call showing the bad answer and asking for the format


class CoachClient:

    def __init__(self, backend: Backend, *, retry: RetryPolicy = RetryPolicy(),
                 concurrency: int = 32, rpm: float = 0, tpm: float = 0,
                 cache: VerdictCache | None = None, tool_output_chars: int = 4000,
                 agent_input_chars: int = 24000, max_output_tokens: int = 1024,
                 prices: dict[str, tuple[float, float]] | None = None, rate_burst_s: float = 10.0,
                 seed: int = 0):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.backend = backend
        self.retry = retry
        self.concurrency = concurrency
        self.cache = cache if cache is not None else VerdictCache("")
        self.tool_output_chars = tool_output_chars
        self.agent_input_chars = agent_input_chars
        self.max_output_tokens = max_output_tokens
        self.ledger = Ledger()
        self._price = price_of(backend.model, prices)
        if self._price is None and backend.name in ("gemini", "openai"):
            self.ledger.unpriced_models.add(backend.model)
        self._rpm = AsyncTokenBucket(rpm, burst_s=rate_burst_s)
        self._tpm = AsyncTokenBucket(tpm, burst_s=rate_burst_s)
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prepared = False
        self._inflight: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._rng = random.Random(seed)

    # ---- public API -------------------------------------------------------------------------------

    def check_credentials(self) -> None:
        """Raise CoachCredentialsError now (before rollouts) if the backend lacks a key."""
        self.backend.check_credentials()

    def prompt_for(self, request: CoachRequest) -> Prompt:
        return build_prompt(request, output_format=self.backend.output_format,
                            tool_output_chars=self.tool_output_chars,
                            agent_input_chars=self.agent_input_chars)

    def submit(self, request: CoachRequest) -> "asyncio.Future[Verdict]":
        """Start judging `request` in the running event loop; returns at once with a future."""
        task = asyncio.get_running_loop().create_task(self.score(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def score_all(self, requests: Iterable[CoachRequest]) -> list[Verdict]:
        return list(await asyncio.gather(*(self.submit(r) for r in requests)))

    def score_all_sync(self, requests: Iterable[CoachRequest]) -> list[Verdict]:
        """For scripts without an event loop; closes the backend's connections at the end."""
        async def run():
            try:
                return await self.score_all(requests)
            finally:
                await self.backend.aclose()
        return asyncio.run(run())

    def metrics(self) -> dict:
        self.ledger.rate_limit_wait_s = self._rpm.waited_s + self._tpm.waited_s
        out = self.ledger.metrics()
        out["cache_entries"] = len(self.cache)
        return out

    def export_cache(self) -> bytes:
        return self.cache.export_bytes()

    def import_cache(self, blob: bytes) -> int:
        return self.cache.import_bytes(blob)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.backend.aclose()

    # ---- one request ------------------------------------------------------------------------------

    async def score(self, request: CoachRequest) -> Verdict:
        start = time.monotonic()
        self.ledger.requests += 1
        prompt = self.prompt_for(request)
        key = cache_key(self.backend.name, self.backend.model, prompt.cache_text())
        hit = self.cache.get(key)
        if hit is None and key in self._inflight:  # an identical request is being judged right now
            hit = await asyncio.shield(self._inflight[key])
            if not hit.ok:  # its failure is shared too, but counted for this request
                self._count_fallback(hit.fallback_reason)
                return dataclasses.replace(hit, latency_s=time.monotonic() - start, tokens_in=0,
                                           tokens_out=0, cost_usd=0.0)
        if hit is not None:
            self.ledger.cache_hits += 1
            self.ledger.ok += 1
            return dataclasses.replace(hit, cached=True, latency_s=time.monotonic() - start,
                                       tokens_in=0, tokens_out=0, cost_usd=0.0)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            verdict = await self._judge(prompt, start)
            if verdict.ok:
                try:
                    self.cache.put(key, verdict)
                except Exception as e:  # pylint: disable=broad-except
                    log.warning("coach cache write failed (verdict kept, not cached): %s", redact(e))
            future.set_result(verdict)
            return verdict
        except BaseException:  # cancelled (the judge catches every Exception): waiters stop too
            future.cancel()
            raise
        finally:
            del self._inflight[key]

    async def _judge(self, prompt: Prompt, start: float) -> Verdict:
        tokens_in = tokens_out = 0
        retries = 0
        repaired = False
        while True:
            try:
                raw = await self._call(prompt)
            except BackendError as e:
                if e.retryable and retries < self.retry.max_retries:
                    retries += 1
                    self.ledger.retries += 1
                    self.ledger.retries_by_reason[e.reason] += 1
                    await asyncio.sleep(self._backoff(retries, e.retry_after_s))
                    continue
                return self._fallback(e.reason, e, start, tokens_in, tokens_out)
            except asyncio.CancelledError:
                raise
            except CoachCredentialsError as e:
                return self._fallback("client_error", e, start, tokens_in, tokens_out)
            except Exception as e:  # pylint: disable=broad-except
                # A bug or an unexpected library error must not take the batch down; it is recorded.
                log.warning("coach backend raised %s: %s", type(e).__name__, redact(e))
                return self._fallback("backend_error", e, start, tokens_in, tokens_out)
            tokens_in += raw.tokens_in
            tokens_out += raw.tokens_out
            try:
                parsed = parse_verdict(raw.text, prompt.output_format)
            except ParseError as e:
                if self.retry.format_repair and not repaired:
                    repaired = True
                    self.ledger.repairs += 1
                    prompt = prompt.with_repair(raw.text, str(e))
                    continue
                return self._fallback(e.reason, e, start, tokens_in, tokens_out)
            self.ledger.ok += 1
            latency = time.monotonic() - start
            self.ledger.latencies_s.append(latency)
            return Verdict(score=parsed.score, reward=parsed.score / 10.0,
                           reasoning=redact(parsed.reasoning), correct=parsed.correct, status="ok",
                           latency_s=latency, tokens_in=tokens_in, tokens_out=tokens_out,
                           cost_usd=self._cost(tokens_in, tokens_out))

    async def _call(self, prompt: Prompt) -> RawResult:
        estimate = sum(len(t) for _, t in prompt.turns) // 4 + len(prompt.system) // 4 + self.max_output_tokens
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop; a new asyncio.run rebinds
            self._loop = loop       # (before the rate limiters' locks are first taken in this loop)
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._rpm.rebind()
            self._tpm.rebind()
        await self._rpm.acquire(1)
        await self._tpm.acquire(estimate)
        if not self._prepared:  # SDK imports and client setup must not eat the first call's timeout
            self.backend.prepare()
            self._prepared = True
        async with self._semaphore:
            self.ledger.calls += 1
            try:
                raw = await asyncio.wait_for(self.backend.score(prompt, SCORE_SCHEMA), self.retry.timeout_s)
            except asyncio.TimeoutError:
                raise BackendError("timeout", f"no answer within timeout_s={self.retry.timeout_s:g}",
                                   retryable=True) from None
        self.ledger.tokens_in += raw.tokens_in
        self.ledger.tokens_out += raw.tokens_out
        self.ledger.cost_usd += self._cost(raw.tokens_in, raw.tokens_out)
        if raw.tokens_in or raw.tokens_out:
            self._tpm.adjust(raw.tokens_in + raw.tokens_out - estimate)
        return raw

    def _backoff(self, retry: int, retry_after_s: float | None) -> float:
        delay = min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2 ** (retry - 1))
        delay *= self._rng.uniform(0.5, 1.0)
        if retry_after_s is not None:  # the server knows best, within our cap
            delay = max(delay, min(retry_after_s, self.retry.backoff_max_s))
        return delay

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        if self._price is None:
            return 0.0
        return (tokens_in * self._price[0] + tokens_out * self._price[1]) / 1e6

    def _count_fallback(self, reason: str | None) -> None:
        self.ledger.fallbacks += 1
        self.ledger.fallbacks_by_reason[reason or "backend_error"] += 1

    def _fallback(self, reason: str, error: BaseException, start: float, tokens_in: int,
                  tokens_out: int) -> Verdict:
        self._count_fallback(reason)
        detail = redact(f"{type(error).__name__}: {error}")
        log.info("coach verdict is a fallback (%s): %s", reason, detail[:300])
        return Verdict(score=None, reward=None, reasoning=detail,
                       correct=None, status="fallback", fallback_reason=reason,
                       latency_s=time.monotonic() - start, tokens_in=tokens_in, tokens_out=tokens_out,
                       cost_usd=self._cost(tokens_in, tokens_out))
