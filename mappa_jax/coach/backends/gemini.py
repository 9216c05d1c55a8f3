"""Gemini through google-genai's async client (API key or Vertex AI)."""
from __future__ import annotations

import os
from typing import Any

from mappa_jax.coach.backends.base import error_from_status, error_from_transport
from mappa_jax.coach.backends.per_loop import PerLoop
from mappa_jax.coach.prompts import Prompt
from mappa_jax.coach.redaction import redact, register_secret
from mappa_jax.coach.types import BackendError, CoachCredentialsError, RawResult

_DEFAULT_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


class GeminiBackend:
    """`client.aio.models.generate_content` at temperature 0 with a JSON response schema.

    google-genai's own retries are switched off (attempts=1): CoachClient owns retries and timeouts.
    An SDK client's async connection pool belongs to the event loop it first ran in, so there is
    one client per running loop (`loop_clients`, see PerLoop), closed inside that loop when it shuts down.
    """
    name = "gemini"
    output_format = "json"

    def __init__(self, *, model: str, api_key_env: str = "", vertexai: bool = False,
                 project: str = "", location: str = "us-central1", base_url: str = "",
                 max_output_tokens: int = 4096, timeout_s: float = 60.0):
        self.model = model
        self.api_key_env = api_key_env
        self.vertexai = vertexai
        self.project = project
        self.location = location
        self.base_url = base_url
        self.max_output_tokens = max_output_tokens
        self._timeout_s = timeout_s
        self.loop_clients = PerLoop(self._new_client, _close_client, name="gemini-client")

    def _key_envs(self) -> tuple[str, ...]:
        return (self.api_key_env,) if self.api_key_env else _DEFAULT_KEY_ENVS

    def _api_key(self) -> str | None:
        for env in self._key_envs():
            if os.environ.get(env):
                register_secret(os.environ[env])
                return os.environ[env]
        return None

    def check_credentials(self) -> None:
        if self.vertexai:
            if not (self.project or os.environ.get("GOOGLE_CLOUD_PROJECT")):
                raise CoachCredentialsError(
                    "coach backend 'gemini' with vertexai=True needs a project: set config key "
                    "coach.gemini.project or the environment variable GOOGLE_CLOUD_PROJECT.")
            import google.auth  # pylint: disable=import-outside-toplevel
            from google.auth import exceptions  # pylint: disable=import-outside-toplevel
            try:
                google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
            except exceptions.DefaultCredentialsError as e:
                raise CoachCredentialsError(
                    "coach backend 'gemini' with vertexai=True needs Application Default Credentials "
                    "(gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS naming a "
                    f"service-account file): {redact(e)}") from None
            return
        if self._api_key() is None:
            raise CoachCredentialsError(
                "coach backend 'gemini' needs an API key: set the environment variable "
                + " or ".join(repr(e) for e in self._key_envs())
                + " (config key coach.gemini.api_key_env picks another), or use Vertex AI "
                "(coach.gemini.vertexai=True with coach.gemini.project).")

    def prepare(self) -> None:
        self.loop_clients.get()  # importing google-genai and building the client takes ~0.5 s

    def _new_client(self):
        from google import genai  # pylint: disable=import-outside-toplevel
        from google.genai import types  # pylint: disable=import-outside-toplevel
        http_options = types.HttpOptions(
            base_url=self.base_url or None, timeout=int(self._timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=1))
        if self.vertexai:
            return genai.Client(vertexai=True, project=self.project or None, location=self.location,
                                http_options=http_options)
        self.check_credentials()
        return genai.Client(api_key=self._api_key(), http_options=http_options)

    async def score(self, prompt: Prompt, schema: dict[str, Any]) -> RawResult:
        from google.genai import errors, types  # pylint: disable=import-outside-toplevel
        contents = [types.Content(role="model" if role == "assistant" else "user",
                                  parts=[types.Part(text=text)]) for role, text in prompt.turns]
        config = types.GenerateContentConfig(
            system_instruction=prompt.system, temperature=0.0,
            max_output_tokens=self.max_output_tokens,
            response_mime_type="application/json", response_json_schema=schema)
        try:
            response = await self.loop_clients.get().aio.models.generate_content(
                model=self.model, contents=contents, config=config)
        except errors.APIError as e:
            raise error_from_status(int(e.code or 0), f"{e.status}: {e.message}",
                                    getattr(e.response, "headers", None)) from None
        except BackendError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            error = error_from_transport(e)
            if error is None:
                raise
            raise error from None
        try:
            text = response.text
        except ValueError as e:  # e.g. a candidate with several parts of mixed types
            raise BackendError("backend_error", f"unreadable Gemini response: {e}", retryable=True) from None
        if text is None:
            finish = response.candidates[0].finish_reason if response.candidates else "no candidates"
            raise BackendError("backend_error", f"Gemini returned no text (finish reason: {finish})",
                               retryable=True)
        usage = response.usage_metadata
        tokens_in = int(getattr(usage, "prompt_token_count", 0) or 0)
        # Thinking tokens are billed as output tokens.
        tokens_out = int(getattr(usage, "candidates_token_count", 0) or 0) + int(
            getattr(usage, "thoughts_token_count", 0) or 0)
        return RawResult(text=text, tokens_in=tokens_in, tokens_out=tokens_out, structured=True)

    async def aclose(self) -> None:
        await self.loop_clients.aclose()


async def _close_client(client) -> None:
    """The async pool, then the sync one (both exist on every google-genai client)."""
    try:
        await client.aio.aclose()
    except AttributeError:  # google-genai releases before aclose()
        pass
    close = getattr(client, "close", None)
    if close is not None:
        close()
