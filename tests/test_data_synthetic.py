"""Offline math tasks: our arithmetic word problems and reasoning-gym generators."""
import re

import pytest

from mappa_jax.data import (DataError, SyntheticMathTasks, arithmetic_tasks, reasoning_gym_tasks,
                            task_source)
from mappa_jax.data.synthetic import arithmetic_task


def _numbers(text):
    return [int(n) for n in re.findall(r"\d+", text)]


def _recompute(task):
    """Independent re-reading of each template's statement: the numbers in order of mention."""
    n = _numbers(task.prompt)
    template = task.metadata["template"]
    if template == "change":  # count, price, paid
        return n[2] - n[0] * n[1]
    if template == "sharing":  # start, each, friends, bought
        return n[0] - n[1] * n[2] + n[3]
    if template == "production":  # rate, hours, days, defective
        return n[0] * n[1] * n[2] - n[3]
    if template == "ages":  # factor, young age, years
        return n[0] * n[1] + n[1] + 2 * n[2]
    if template == "savings_split":  # weekly, weeks, extra, spent, people
        total = n[0] * n[1] + n[2] - n[3]
        assert total % n[4] == 0
        return total // n[4]
    raise AssertionError(template)


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_arithmetic_answers_match_their_statements(difficulty):
    tasks = arithmetic_tasks(60, seed=11, difficulty=difficulty)
    for task in tasks:
        assert task.answer == str(_recompute(task)), task.prompt
        assert int(task.answer) >= 0
    templates = {t.metadata["template"] for t in tasks}
    assert templates == ({"change", "sharing"} if difficulty == 1 else
                         {"change", "sharing", "production", "ages", "savings_split"})
    assert len({t.task_id for t in tasks}) == 60


def test_arithmetic_is_seeded_and_difficulty_scales_numbers():
    assert arithmetic_tasks(5, seed=3) == arithmetic_tasks(5, seed=3)
    assert arithmetic_tasks(5, seed=3) != arithmetic_tasks(5, seed=4)
    assert arithmetic_task(3, 4) == arithmetic_tasks(5, seed=3)[4]  # any index regenerates alone
    easy = max(max(_numbers(t.prompt)) for t in arithmetic_tasks(50, seed=0, difficulty=1))
    hard = max(max(_numbers(t.prompt)) for t in arithmetic_tasks(50, seed=0, difficulty=5))
    assert easy < 200 < hard
    with pytest.raises(DataError, match="difficulty must be one of"):
        arithmetic_task(0, 0, difficulty=9)


def test_reasoning_gym_tasks_and_synthetic_builder(tmp_path):
    import reasoning_gym
    tasks = reasoning_gym_tasks("simple_equations", 4, seed=2)
    reference = reasoning_gym.create_dataset("simple_equations", size=4, seed=2)
    assert [(t.prompt, t.answer) for t in tasks] == [(e["question"], e["answer"])
                                                    for e in reference]
    assert {t.task_type for t in tasks} == {"simple_equations"}
    with pytest.raises(DataError, match="reasoning-gym cannot create dataset 'no_such_gen'"):
        reasoning_gym_tasks("no_such_gen", 2)

    builder = SyntheticMathTasks(arithmetic_count=6, difficulty=2, seed=5,
                                 reasoning_gym={"basic_arithmetic": 3, "gsm_symbolic": 2},
                                 data_dir=tmp_path)
    source = task_source(builder)
    types = sorted(source.index_fields()[1])
    assert types == ["arithmetic"] * 6 + ["basic_arithmetic"] * 3 + ["gsm_symbolic"] * 2
    assert sorted(t.task_id for t in source) == sorted(
        [t.task_id for t in arithmetic_tasks(6, 5, 2)]
        + [f"basic_arithmetic/s5-{i}" for i in range(3)]
        + [f"gsm_symbolic/s5-{i}" for i in range(2)])
    with pytest.raises(DataError, match="produced no tasks"):
        SyntheticMathTasks(arithmetic_count=0, data_dir=tmp_path)


def test_builder_from_spec(tmp_path):
    from mappa_jax.data import builder_from_spec
    builder = builder_from_spec({"source": "synthetic", "arithmetic_count": 3, "seed": 2},
                                data_dir=tmp_path)
    assert sorted(t.task_id for t in task_source(builder)) == sorted(
        t.task_id for t in arithmetic_tasks(3, seed=2))
    with pytest.raises(DataError, match=r"unknown key\(s\) \['arithmetic_cnt'\]"):
        builder_from_spec({"source": "synthetic", "arithmetic_cnt": 3}, data_dir=tmp_path)
    with pytest.raises(DataError, match="'source' must be one of"):
        builder_from_spec({"source": "kaggle"}, data_dir=tmp_path)
    with pytest.raises(DataError, match="source 'dsbench'.*answers_root"):
        builder_from_spec({"source": "dsbench", "tasks_root": "x"}, data_dir=tmp_path)


def test_templates_select_problem_families_and_name_bad_ones():
    from mappa_jax.data import synthetic
    change = synthetic.arithmetic_tasks(40, seed=3, difficulty=2, templates=("change",))
    assert {t.metadata["template"] for t in change} == {"change"}
    mixed = synthetic.arithmetic_tasks(40, seed=3, difficulty=2)
    assert {t.metadata["template"] for t in mixed} > {"change"}
    # The family's problems are right: paid - count * price, read back from the text.
    for task in change:
        words = task.prompt.split()
        count, price, paid = int(words[2]), int(words[5]), int(words[11])
        assert int(task.answer) == paid - count * price
    assert not {t.task_id for t in change} & {t.task_id for t in mixed}  # ids name the selection
    with pytest.raises(DataError, match="unknown; known"):
        synthetic.arithmetic_tasks(2, templates=("chnage",))
    with pytest.raises(DataError, match="not unlocked at difficulty 1"):
        synthetic.arithmetic_tasks(2, difficulty=1, templates=("ages",))
