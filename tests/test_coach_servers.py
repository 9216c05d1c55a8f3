"""CoachClient against a real HTTP server on 127.0.0.1 with injected faults.

The Gemini cases go through google-genai's real async client (base_url pointed at the fake).
"""
import asyncio
import gc
import glob
import time
import uuid
import warnings

import pytest

from mappa_jax.coach import CoachCredentialsError, CoachRequest, coach_config, make_coach
from mappa_jax.coach.testing import FakeCoachServer

GEMINI_KEY = "AIzaTESTKEY-0123456789abcdefghijklmn"
OPENAI_KEY = "sk-test-0123456789abcdefghijklmnop"
TIMEOUT_S = 1.0  # generous: a loaded CI box must not turn a normal call into a timeout
MAX_RETRIES = 2


@pytest.fixture(scope="module")
def server():
    with FakeCoachServer(hang_s=20.0) as s:
        yield s


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("COACH_TEST_OPENAI_KEY", OPENAI_KEY)


def _config(server, flavour, **overrides):
    c = coach_config()
    c.backend = "gemini" if flavour == "gemini" else "openai"
    c.model = "gemini-2.5-flash" if flavour == "gemini" else "gpt-4o-mini"
    c.gemini.base_url = server.url
    c.openai.base_url = server.url + "/v1"
    c.openai.api_key_env = "COACH_TEST_OPENAI_KEY"
    c.openai.structured_output = flavour != "openai_text"
    c.timeout_s = TIMEOUT_S
    c.max_retries = MAX_RETRIES
    c.backoff_base_s = 0.01
    c.backoff_max_s = 0.05
    c.rpm = 0
    c.tpm = 0
    for key, value in overrides.items():
        c[key] = value
    return c


def _request(marker, **overrides):
    fields = dict(pipeline="mathchat", task=f"Compute 2 + 2. {marker}", role="verifier",
                  role_instructions="Box the final answer.", agent_input="The solver says 4.",
                  agent_output="\\boxed{4}", episode_id="ep", agent="verifier", turn=0)
    fields.update(overrides)
    return CoachRequest(**fields)


def _run(client, requests):
    async def go():
        try:
            return await client.score_all(requests)
        finally:
            await client.aclose()
    return asyncio.run(go())


# fault -> (status, fallback_reason | None, calls, retries, repairs). JSON and text modes differ
# only in how an unparseable answer is classified.
def _fault_table(flavour):
    unparseable = "no_score" if flavour == "openai_text" else "malformed_json"
    bad_format = "no_score" if flavour == "openai_text" else "malformed_json"
    return {
        "[[score:3]]": ("ok", None, 1, 0, 0),
        "[[fault:429*2#{t}]]": ("ok", None, 3, 2, 0),
        "[[fault:429*all#{t}]]": ("fallback", "rate_limited", 1 + MAX_RETRIES, MAX_RETRIES, 0),
        "[[fault:500*all#{t}]]": ("fallback", "server_error", 1 + MAX_RETRIES, MAX_RETRIES, 0),
        "[[fault:500*1#{t}]]": ("ok", None, 2, 1, 0),
        "[[fault:hang*1#{t}]]": ("ok", None, 2, 1, 0),
        "[[fault:hang*all#{t}]]": ("fallback", "timeout", 1 + MAX_RETRIES, MAX_RETRIES, 0),
        "[[fault:drop*1#{t}]]": ("ok", None, 2, 1, 0),
        "[[fault:badjson*1#{t}]]": ("ok", None, 2, 0, 1),
        "[[fault:badjson*all#{t}]]": ("fallback", bad_format, 2, 0, 1),
        "[[fault:unparseable*all#{t}]]": ("fallback", unparseable, 2, 0, 1),
        "[[fault:range*1#{t}]]": ("ok", None, 2, 0, 1),
        "[[fault:range*all#{t}]]": ("fallback", "out_of_range", 2, 0, 1),
        "[[fault:echo401*1#{t}]]": ("fallback", "client_error", 1, 0, 0),
    }


@pytest.mark.parametrize("flavour", ["openai_json", "openai_text", "gemini"])
def test_faults_end_ok_or_fallback_and_ledger_matches(server, keys, flavour):
    tag = uuid.uuid4().hex[:8]
    table = {marker.format(t=tag): expected for marker, expected in _fault_table(flavour).items()}
    client = make_coach(_config(server, flavour))
    hits_before = server.hits
    verdicts = _run(client, [_request(marker) for marker in table])
    m = client.metrics()

    for (marker, (status, reason, *_)), verdict in zip(table.items(), verdicts):
        assert (verdict.status, verdict.fallback_reason) == (status, reason), marker
        if status == "ok":
            expected_score = 3.0 if marker == "[[score:3]]" else 7.0
            assert verdict.score == expected_score and verdict.reward == expected_score / 10, marker
        else:
            assert verdict.score is None and verdict.reward is None, marker
        assert GEMINI_KEY not in verdict.reasoning and OPENAI_KEY not in verdict.reasoning

    expected = list(table.values())
    assert m["requests"] == len(table)
    assert m["ok"] == sum(e[0] == "ok" for e in expected)
    assert m["fallbacks"] == sum(e[0] == "fallback" for e in expected)
    for reason in {e[1] for e in expected if e[1]}:
        assert m[f"fallbacks/{reason}"] == sum(e[1] == reason for e in expected), reason
    assert m["calls"] == sum(e[2] for e in expected)
    assert m["retries"] == sum(e[3] for e in expected)
    assert m["repairs"] == sum(e[4] for e in expected)
    assert server.hits - hits_before == m["calls"]  # every call reached the server, no hidden retries
    assert m["tokens_in"] > 0 and m["cost_usd"] > 0
    assert m["latency_p50_s"] <= m["latency_p90_s"] <= m["latency_p99_s"]


def test_repair_call_shows_the_bad_answer_in_the_original_context(server, keys):
    tag = uuid.uuid4().hex[:8]
    client = make_coach(_config(server, "openai_json"))
    [verdict] = _run(client, [_request(f"[[fault:badjson*1#{tag}]]")])
    assert verdict.ok
    calls = [b["body"] for b in server.bodies if tag in str(b["body"])]
    assert len(calls) == 2
    first, repair = calls[0]["messages"], calls[1]["messages"]
    assert repair[:len(first)] == first
    assert repair[len(first)]["role"] == "assistant" and "{score: seven" in repair[len(first)]["content"]
    assert repair[-1]["role"] == "user" and "could not be used" in repair[-1]["content"]
    assert calls[0]["temperature"] == 0.0 and calls[0]["response_format"]["type"] == "json_schema"


def test_gemini_request_shape(server, keys):
    tag = uuid.uuid4().hex[:8]
    client = make_coach(_config(server, "gemini"))
    [verdict] = _run(client, [_request(f"[[score:9]] {tag}")])
    assert verdict.ok and verdict.score == 9.0
    [call] = [b for b in server.bodies if tag in str(b["body"])]
    assert call["path"].endswith("/models/gemini-2.5-flash:generateContent")
    assert call["credential"] == GEMINI_KEY  # the real client sends the key as x-goog-api-key
    config = call["body"]["generationConfig"]
    assert config["temperature"] == 0.0 and config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"]["properties"]["score"]["maximum"] == 10
    assert "systemInstruction" in call["body"]


def _wait_until_closed(server, deadline_s=5.0):
    """The server notices a client's close a moment after the client made it."""
    deadline = time.monotonic() + deadline_s
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.open_connections


@pytest.mark.parametrize("flavour", ["openai_json", "gemini"])
def test_consecutive_rollouts_each_in_a_fresh_event_loop(keys, flavour):
    """As train.py runs them: each rollout under its own asyncio.run, the coach never closed in
    between. Every loop gets working connections of its own, closed inside that loop (the server
    sees none left open), a later aclose from yet another loop is harmless, and rate limiters
    whose lock was contended in one loop work in the next."""
    tag = uuid.uuid4().hex[:8]
    with FakeCoachServer() as own:  # its own server: open connections are this test's alone
        # A 5-request burst refilled at 10/s: the 6th of 10 requests submitted at once sleeps
        # holding the limiter's lock and the others queue on it.
        client = make_coach(_config(own, flavour, rpm=600.0, rate_burst_s=0.5))
        waited = [0.0]

        async def rollout(i):
            futures = [client.submit(_request(f"[[score:{(i + k) % 10}]] {tag}-{i}-{k}"))
                       for k in range(10)]
            return await asyncio.gather(*futures)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for i in range(2):
                verdicts = asyncio.run(rollout(i))
                assert [(v.status, v.score) for v in verdicts] == [
                    ("ok", float((i + k) % 10)) for k in range(10)]
                assert own.hits == 10 * (i + 1)
                waited.append(client.metrics()["rate_limit_wait_s"])
                assert waited[-1] > waited[-2]  # this rollout waited on the limiter
                assert _wait_until_closed(own) == 0, f"rollout {i} left connections open"
                gc.collect()
            asyncio.run(client.aclose())
            gc.collect()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaks
        assert client.backend.loop_clients.created == 2


@pytest.mark.parametrize("flavour", ["openai_json", "gemini"])
def test_cache_answers_repeats_without_server_calls_and_survives_restart(server, keys, tmp_path, flavour):
    tag = uuid.uuid4().hex[:8]
    path = str(tmp_path / "coach_cache.sqlite")
    requests = [_request(f"[[score:{i}]] {tag}") for i in range(5)]
    first = make_coach(_config(server, flavour, cache_path=path))
    hits = server.hits
    verdicts = _run(first, requests)
    assert server.hits - hits == 5 and not any(v.cached for v in verdicts)
    exported = first.export_cache()

    # Same requests under other ids, in a new client on the same file (a restart): no server calls.
    again = [_request(f"[[score:{i}]] {tag}", episode_id=f"other-{i}", turn=i) for i in range(5)]
    restarted = make_coach(_config(server, flavour, cache_path=path))
    hits = server.hits
    cached = _run(restarted, again)
    assert server.hits == hits
    assert [v.score for v in cached] == [float(i) for i in range(5)] and all(v.cached for v in cached)
    assert restarted.metrics()["cache_hits"] == 5 and restarted.metrics()["calls"] == 0

    # A checkpoint's exported cache restores into a fresh in-memory cache.
    fresh = make_coach(_config(server, flavour))
    assert fresh.import_cache(exported) == 5
    hits = server.hits
    assert [v.score for v in _run(fresh, requests)] == [float(i) for i in range(5)]
    assert server.hits == hits


def test_identical_concurrent_requests_make_one_call(server, keys):
    tag = uuid.uuid4().hex[:8]
    client = make_coach(_config(server, "openai_json"))
    hits = server.hits
    verdicts = _run(client, [_request(f"[[score:5]] {tag}", episode_id=str(i)) for i in range(6)])
    assert server.hits - hits == 1
    assert [v.score for v in verdicts] == [5.0] * 6 and sum(v.cached for v in verdicts) == 5


def test_fallbacks_are_not_cached(server, keys, tmp_path):
    tag = uuid.uuid4().hex[:8]
    config = _config(server, "openai_json", cache_path=str(tmp_path / "c.sqlite"), max_retries=0)
    [failed] = _run(make_coach(config), [_request(f"[[fault:500*1#{tag}]]")])
    assert failed.status == "fallback"
    [retried] = _run(make_coach(config), [_request(f"[[fault:500*1#{tag}]]")])
    assert retried.ok and not retried.cached


def test_keys_never_reach_errors_or_cache(server, keys, tmp_path):
    tag = uuid.uuid4().hex[:8]
    for flavour, key in (("gemini", GEMINI_KEY), ("openai_json", OPENAI_KEY)):
        path = str(tmp_path / f"{flavour}.sqlite")
        client = make_coach(_config(server, flavour, cache_path=path))
        leaked, echoed = _run(client, [_request(f"[[fault:leak*1#{tag}{flavour}]]"),
                                       _request(f"[[fault:echo401*1#{tag}{flavour}]]")])
        assert leaked.ok and "[REDACTED]" in leaked.reasoning and key not in leaked.reasoning
        assert echoed.fallback_reason == "client_error" and "[REDACTED]" in echoed.reasoning
        assert key not in echoed.reasoning
        assert key.encode() not in client.export_cache()
        for file in glob.glob(path + "*"):  # the database and its write-ahead log
            with open(file, "rb") as f:
                assert key.encode() not in f.read()
    # A backend error raised directly also carries no key.
    from mappa_jax.coach.backends import OpenAICompatBackend
    from mappa_jax.coach.types import BackendError
    backend = OpenAICompatBackend(model="m", base_url=server.url + "/v1",
                                  api_key_env="COACH_TEST_OPENAI_KEY")
    prompt = make_coach(_config(server, "openai_json")).prompt_for(
        _request(f"[[fault:echo401*1#{tag}direct]]"))

    async def direct():
        try:
            await backend.score(prompt, {})
        finally:
            await backend.aclose()
    with pytest.raises(BackendError) as info:
        asyncio.run(direct())
    assert OPENAI_KEY not in str(info.value) and "[REDACTED]" in str(info.value)


def test_missing_key_fails_fast_with_a_clear_message(server, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("COACH_TEST_OPENAI_KEY", raising=False)
    gemini = make_coach(_config(server, "gemini"))
    with pytest.raises(CoachCredentialsError, match="GEMINI_API_KEY"):
        gemini.check_credentials()
    openai = make_coach(_config(server, "openai_json"))
    with pytest.raises(CoachCredentialsError, match="COACH_TEST_OPENAI_KEY"):
        openai.check_credentials()
    # Scoring anyway ends in a fallback without a server call, not a crash.
    hits = server.hits
    [verdict] = _run(gemini, [_request("[[score:4]] nokey")])
    assert verdict.fallback_reason == "client_error" and server.hits == hits
    monkeypatch.setenv("GOOGLE_API_KEY", GEMINI_KEY)
    gemini.check_credentials()  # the second documented variable works too


def test_concurrency_limit_and_non_blocking_submit(keys):
    with FakeCoachServer(latency_s=0.1) as slow:
        client = make_coach(_config(slow, "openai_json", concurrency=3, timeout_s=5.0))

        async def go():
            futures = [client.submit(_request(f"[[score:{i % 11}]] c{i}")) for i in range(9)]
            assert not any(f.done() for f in futures)  # submit returned before any server answer
            verdicts = await asyncio.gather(*futures)
            await client.aclose()
            return verdicts
        verdicts = asyncio.run(go())
        assert [v.score for v in verdicts] == [float(i % 11) for i in range(9)]
        assert slow.max_in_flight == 3
