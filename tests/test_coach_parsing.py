"""Strict verdict parsing and prompt rendering (no server needed)."""
import json

import pytest

from mappa_jax.coach import CoachRequest, SCORE_SCHEMA, build_prompt
from mappa_jax.coach.parsing import parse_json_verdict, parse_text_verdict
from mappa_jax.coach.prompts import known_roles, truncate_middle
from mappa_jax.coach.types import ParseError


def _request(**overrides):
    fields = dict(pipeline="mathchat", task="Find x if 2x = 6.", role="verifier",
                  role_instructions="Box the final answer.", agent_input="Solver says x=3.",
                  agent_output="Checked: \\boxed{3}", tool_output="", episode_id="ep-1", agent="verifier",
                  turn=0)
    fields.update(overrides)
    return CoachRequest(**fields)


@pytest.mark.parametrize("text,score,correct", [
    ('{"reasoning": "ok", "score": 7, "correct": null}', 7.0, None),
    ('```json\n{"reasoning": "ok", "score": 0, "correct": true}\n```', 0.0, True),
    ('{"reasoning": "ok", "score": 10, "correct": false}', 10.0, False),
])
def test_json_verdict_accepts_valid_answers(text, score, correct):
    parsed = parse_json_verdict(text)
    assert (parsed.score, parsed.correct, parsed.reasoning) == (score, correct, "ok")


@pytest.mark.parametrize("text,reason", [
    ("{score: seven}", "malformed_json"),
    ("The answer deserves 8.", "malformed_json"),
    ('{"reasoning": "no score"}', "malformed_json"),
    ('{"score": "7"}', "malformed_json"),
    ('{"score": true}', "malformed_json"),
    ('[7]', "malformed_json"),
    ('{"score": 7, "correct": "yes"}', "malformed_json"),
    ('{"score": 11}', "out_of_range"),
    ('{"score": -1}', "out_of_range"),
])
def test_json_verdict_rejects_bad_answers(text, reason):
    with pytest.raises(ParseError) as info:
        parse_json_verdict(text)
    assert info.value.reason == reason


def test_text_verdict_reads_only_the_score_line():
    text = ("Step 1 has 3 errors; 2 of the 4 checks pass.\n**PROCESS_SCORE:** 6\nCORRECT: no\n")
    parsed = parse_text_verdict(text)
    assert parsed.score == 6.0 and parsed.correct is False
    assert "PROCESS_SCORE" not in parsed.reasoning and "3 errors" in parsed.reasoning
    assert parse_text_verdict("fine\nPROCESS_SCORE: 7/10").score == 7.0
    assert parse_text_verdict("<think>PROCESS_SCORE: 2</think>final\nPROCESS_SCORE: 9").score == 9.0


@pytest.mark.parametrize("text,reason", [
    ("I would give it 8 out of 10.", "no_score"),           # never "first number in the text"
    ("PROCESS_SCORE is 8", "no_score"),
    ("score 5\nPROCESS_SCORE: 3\nPROCESS_SCORE: 8", "no_score"),  # conflicting lines
    ("PROCESS_SCORE: 12", "out_of_range"),
    ("PROCESS_SCORE: -2", "out_of_range"),
])
def test_text_verdict_rejects_bad_answers(text, reason):
    with pytest.raises(ParseError) as info:
        parse_text_verdict(text)
    assert info.value.reason == reason


def test_prompt_excludes_ids_and_includes_ground_truth_only_when_given():
    a = build_prompt(_request())
    b = build_prompt(_request(episode_id="ep-2", agent="someone", turn=3))
    assert a.cache_text() == b.cache_text()
    assert "ep-1" not in a.cache_text()
    assert "Ground truth" not in a.turns[0][1]
    with_truth = build_prompt(_request(ground_truth="3"))
    assert "## Ground truth (reference answer)\n3" in with_truth.turns[0][1]
    assert with_truth.cache_text() != a.cache_text()


def test_prompt_has_role_rubric_blame_rule_and_format():
    for pipeline in ("mathchat", "datascience"):
        roles = known_roles(pipeline)
        assert len(roles) == 3
        texts = {role: build_prompt(_request(pipeline=pipeline, role=role)).turns[0][1] for role in roles}
        assert len(set(texts.values())) == 3  # a distinct rubric per role
    prompt = build_prompt(_request(pipeline="datascience", role="analyst",
                                   files_present=("X_train.csv", "y_train.csv"),
                                   harness_metrics={"accuracy": 0.9}))
    assert "Blame the agent actually at fault" in prompt.system
    assert "X_train.csv, y_train.csv" in prompt.turns[0][1]
    assert '{"accuracy": 0.9}' in prompt.turns[0][1]
    assert "PROCESS_SCORE" in build_prompt(_request(), output_format="text").turns[0][1]
    assert set(SCORE_SCHEMA["properties"]) == {"reasoning", "score", "correct"}
    json.dumps(SCORE_SCHEMA)


def test_tool_output_truncation_keeps_head_and_tail():
    out = "START" + "x" * 10_000 + "Traceback: ZeroDivisionError"
    prompt = build_prompt(_request(role="code_executor", tool_output=out), tool_output_chars=200)
    text = prompt.turns[0][1]
    assert "START" in text and "ZeroDivisionError" in text and "x" * 200 not in text
    assert truncate_middle("short", 200) == "short"
    assert len(truncate_middle("a" * 1000, 100)) < 160


def test_repair_prompt_keeps_context():
    prompt = build_prompt(_request())
    repaired = prompt.with_repair("{bad", "answer is not valid JSON")
    assert repaired.turns[0] == prompt.turns[0]
    assert repaired.turns[1] == ("assistant", "{bad")
    assert repaired.turns[2][0] == "user" and "not valid JSON" in repaired.turns[2][1]


def test_request_validation():
    with pytest.raises(ValueError, match="pipeline"):
        _request(pipeline="chess")


def test_cache_key_separates_backend_model_and_prompt():
    from mappa_jax.coach import cache_key
    text = build_prompt(_request()).cache_text()
    keys = {cache_key("gemini", "gemini-2.5-flash", text), cache_key("openai", "gemini-2.5-flash", text),
            cache_key("gemini", "gemini-2.5-pro", text), cache_key("gemini", "gemini-2.5-flash", text + " ")}
    assert len(keys) == 4 and all(len(k) == 64 for k in keys)
