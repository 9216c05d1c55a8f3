"""Math problem files: every layout round-trips through the TFDS array_record builder."""
import json

import pandas as pd
import pytest

from mappa_jax.data import (DataError, MathFilesTasks, MathSource, Task, last_boxed,
                            load_math_tasks, open_prepared, task_source)

AIME_ROWS = [  # AI-MO style: id, problem, solution, answer (integers)
    {"id": 60, "problem": "Find $x$ if $2x = 14$.", "solution": "x = 7", "answer": 7, "year": 2024},
    {"id": 61, "problem": "What is $3^2$?", "solution": "nine", "answer": 9, "year": 2024},
]
MATH_ROWS = [  # hendrycks MATH style: no answer field, answer boxed in the solution
    {"problem": "Simplify $\\frac{2}{4}$.", "level": "Level 1", "type": "Algebra",
     "solution": "First \\boxed{2/4} is wrong; it is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "What set?", "level": "Level 2", "type": "Counting",
     "solution": "The set is \\boxed{\\{1, 2\\}}."},
]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_last_boxed_takes_last_with_nested_and_escaped_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"so \boxed 5") == "5"
    assert last_boxed(r"\boxed{3} then a truncated \boxed{4") == "3"
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxedx{3}") is None


def test_jsonl_json_parquet_layouts_round_trip_through_builder(tmp_path):
    aime = _write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS)
    math_json = tmp_path / "math.json"
    math_json.write_text(json.dumps({"data": MATH_ROWS}))
    # gneubig/aime-1983-2024 style field names, as parquet.
    amc = tmp_path / "amc.parquet"
    pd.DataFrame({"ID": ["1983-1", "1983-2"], "Year": [1983, 1983],
                  "Question": ["Compute $1+1$.", "Compute $2+2$."],
                  "Answer": [2.0, 4.0]}).to_parquet(amc)
    sources = [MathSource(str(aime), "aime"), MathSource(str(math_json), "math"),
               MathSource(str(amc), "amc")]
    expected = load_math_tasks(sources)
    assert [t.task_id for t in expected] == ["aime/60", "aime/61", "math/0", "math/1",
                                             "amc/1983-1", "amc/1983-2"]
    by_id = {t.task_id: t for t in expected}
    assert by_id["aime/60"].answer == "7" and by_id["aime/60"].metadata["year"] == "2024"
    assert by_id["math/0"].answer == r"\frac{1}{2}"
    assert by_id["math/1"].answer == r"\{1, 2\}"
    assert by_id["math/1"].metadata["level"] == "Level 2"
    assert by_id["amc/1983-2"].answer == "4"  # float column from parquet, integer answer
    assert by_id["amc/1983-2"].prompt == "Compute $2+2$."

    builder = MathFilesTasks(sources, data_dir=tmp_path / "tfds")
    source = task_source(builder)
    stored = sorted((source[i] for i in range(len(source))), key=lambda t: t.task_id)
    assert stored == sorted(expected, key=lambda t: t.task_id)
    reopened = open_prepared(builder.data_dir)
    assert sorted(t.task_id for t in reopened) == sorted(by_id)
    assert list(tmp_path.joinpath("tfds").rglob("*.array_record*"))


def test_json_columnar_and_id_map_layouts(tmp_path):
    columnar = tmp_path / "col.json"
    columnar.write_text(json.dumps({"question": ["a?", "b?"], "final_answer": ["1", "2"]}))
    id_map = tmp_path / "map.json"
    id_map.write_text(json.dumps({"p1": {"Problem": "c?", "Answer": "3"}}))
    tasks = load_math_tasks([MathSource(str(columnar), "x"), MathSource(str(id_map), "y")])
    assert [(t.task_id, t.prompt, t.answer) for t in tasks] == [
        ("x/0", "a?", "1"), ("x/1", "b?", "2"), ("y/p1", "c?", "3")]


def test_builder_cache_follows_file_content(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", AIME_ROWS[:1])
    first = task_source(MathFilesTasks([MathSource(str(path), "aime")], data_dir=tmp_path / "d"))
    _write_jsonl(path, AIME_ROWS)
    second = task_source(MathFilesTasks([MathSource(str(path), "aime")], data_dir=tmp_path / "d"))
    assert (len(first), len(second)) == (1, 2)


def test_missing_field_error_names_file_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x?", "notes": "no answer"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 0 has no answer.*'answer'"):
        load_math_tasks([MathSource(str(path), "aime")])
    path = _write_jsonl(tmp_path / "noq.jsonl", [{"answer": "1"}])
    with pytest.raises(DataError, match=r"noq\.jsonl: record 0 has no problem text.*'problem'"):
        load_math_tasks([MathSource(str(path), "aime")])


def test_missing_empty_and_duplicate_errors(tmp_path):
    with pytest.raises(DataError, match=r"math problem file not found: .*nope\.jsonl"):
        load_math_tasks([MathSource(str(tmp_path / "nope.jsonl"), "aime")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no problems"):
        load_math_tasks([MathSource(str(empty), "aime")])
    dup = _write_jsonl(tmp_path / "dup.jsonl", [AIME_ROWS[0], AIME_ROWS[0]])
    with pytest.raises(DataError, match=r"dup\.jsonl: record 1: duplicate id '60'"):
        load_math_tasks([MathSource(str(dup), "aime")])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_math_tasks([MathSource(str(broken), "aime")])
    with pytest.raises(DataError, match="at least one MathSource"):
        MathFilesTasks([], data_dir=tmp_path)


def test_task_json_round_trip_and_validation():
    task = Task("t1", "math", "aime", "What?", "5", metadata={"year": 2024})
    assert Task.from_json(task.to_json()) == task
    assert task.metadata == {"year": "2024"}
    with pytest.raises(DataError, match="kind must be one of"):
        Task("t2", "poetry", "x", "p", "1")
    with pytest.raises(DataError, match="math task 't3' has no answer"):
        Task("t3", "math", "x", "p")


def test_math_directory_tree_one_problem_per_file(tmp_path):
    root = tmp_path / "MATH" / "test"
    for subject, rows in (("algebra", MATH_ROWS[:1]), ("counting", MATH_ROWS[1:])):
        (root / subject).mkdir(parents=True)
        (root / subject / "12.json").write_text(json.dumps(rows[0]))
    (root / "README.txt").write_text("not a problem file")
    tasks = load_math_tasks([MathSource(str(root), "math")])
    assert [(t.task_id, t.answer, t.metadata["type"]) for t in tasks] == [
        ("math/algebra/12", r"\frac{1}{2}", "Algebra"), ("math/counting/12", r"\{1, 2\}",
                                                          "Counting")]
    with pytest.raises(DataError, match=r"no math problem files .* under .*empty"):
        (tmp_path / "empty").mkdir()
        load_math_tasks([MathSource(str(tmp_path / "empty"), "math")])
