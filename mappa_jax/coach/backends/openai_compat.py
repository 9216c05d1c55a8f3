"""OpenAI-compatible chat completions (vLLM, Ollama, OpenAI, ...) over a few shared httpx.AsyncClients."""
from __future__ import annotations

import json
import os
from typing import Any

import httpx

from mappa_jax.coach.backends.base import error_from_status, error_from_transport
from mappa_jax.coach.backends.per_loop import PerLoop
from mappa_jax.coach.prompts import Prompt
from mappa_jax.coach.redaction import register_secret
from mappa_jax.coach.types import BackendError, CoachCredentialsError, RawResult


_CONNECTIONS_PER_POOL = 8


class _Pools:
    """Several small connection pools instead of one big one: httpcore re-scans every (request,
    connection) pair on each state change, which costs ~15 % of the wall time at 64 connections."""

    def __init__(self, clients: list[httpx.AsyncClient]):
        self.clients = clients
        self.in_flight = [0] * len(clients)

    def least_busy(self) -> int:
        return min(range(len(self.clients)), key=self.in_flight.__getitem__)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class OpenAICompatBackend:
    """POST {base_url}/chat/completions. JSON-schema output when `structured_output`, else text.

    httpx's async pools belong to the event loop they first ran in, so there is one set of pools
    per running loop (`loop_clients`, see PerLoop), closed inside that loop when it shuts down.
    """
    name = "openai"

    def __init__(self, *, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY",
                 structured_output: bool = True, max_output_tokens: int = 1024,
                 timeout_s: float = 60.0, max_connections: int = 64):
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.output_format = "json" if structured_output else "text"
        self.max_output_tokens = max_output_tokens
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._ssl_context = None
        self.loop_clients = PerLoop(self._new_pools, _Pools.aclose, name="openai-pools")

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None  # a local server without auth
        key = os.environ.get(self.api_key_env)
        register_secret(key)
        return key

    def check_credentials(self) -> None:
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise CoachCredentialsError(
                f"coach backend 'openai' needs an API key in the environment variable "
                f"{self.api_key_env!r} (config key coach.openai.api_key_env); it is not set. Set it, or set "
                f"api_key_env='' for a server without authentication.")

    def prepare(self) -> None:
        self.loop_clients.get()

    def _new_pools(self) -> _Pools:
        headers = {"content-type": "application/json"}
        key = self._api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        if self._ssl_context is None:  # loading the CA bundle costs ~70 ms: once only
            self._ssl_context = httpx.create_ssl_context()
        n_pools = max(1, -(-self._max_connections // _CONNECTIONS_PER_POOL))
        per_pool = -(-self._max_connections // n_pools)
        return _Pools([httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self._timeout_s),
            verify=self._ssl_context,
            limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool))
                       for _ in range(n_pools)])

    def _body(self, prompt: Prompt, schema: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": "system", "content": prompt.system}]
        messages += [{"role": role, "content": text} for role, text in prompt.turns]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                "max_tokens": self.max_output_tokens}
        if self.output_format == "json":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "coach_verdict", "schema": schema, "strict": True}}
        return body

    async def score(self, prompt: Prompt, schema: dict[str, Any]) -> RawResult:
        pools = self.loop_clients.get()
        pool = pools.least_busy()
        pools.in_flight[pool] += 1
        try:
            response = await pools.clients[pool].post("/chat/completions", json=self._body(prompt, schema))
        except Exception as e:  # pylint: disable=broad-except
            error = error_from_transport(e)
            if error is None:
                raise
            raise error from None
        finally:
            pools.in_flight[pool] -= 1
        if response.status_code != 200:
            raise error_from_status(response.status_code, response.text[:500], response.headers)
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            # A garbled HTTP body (proxy hiccup, truncated stream), not a model answer: retry it.
            raise BackendError("backend_error", f"unreadable completion body ({type(e).__name__}): "
                               f"{response.text[:200]!r}", retryable=True) from None
        usage = data.get("usage") or {}
        return RawResult(text=text or "", tokens_in=int(usage.get("prompt_tokens") or 0),
                         tokens_out=int(usage.get("completion_tokens") or 0),
                         structured=self.output_format == "json")

    async def aclose(self) -> None:
        await self.loop_clients.aclose()
