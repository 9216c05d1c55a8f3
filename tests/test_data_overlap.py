"""Evaluation sets must not leak into training data."""
import pytest

from mappa_jax.data import DataOverlapError, DataScienceFiles, Task, check_no_overlap
from mappa_jax.data.overlap import normalize_problem


def _math(task_id, prompt):
    return Task(task_id, "math", "aime", prompt, "1")


def test_refuses_same_problem_text_under_other_ids_and_formatting():
    train = [_math("aime/2024-1", "Find  the number of  $x$ with $x^2 = 4$."),
             _math("aime/2024-2", "How many primes are below 10?")]
    evals = [_math("eval/1", "find the number of x with  x^2=4."),  # reformatted copy
             _math("eval/2", "How many primes are below 20?"),
             _math("aime/2024-2", "A different text under a training id.")]
    with pytest.raises(DataOverlapError) as err:
        check_no_overlap(train, evals)
    message = str(err.value)
    assert message.startswith("2 evaluation task(s) also appear in the training data")
    assert "'eval/1' has the same problem text as train 'aime/2024-1'" in message
    assert "'aime/2024-2': same task id" in message
    assert "eval/2" not in message


def test_disjoint_sets_pass_and_normalization():
    check_no_overlap([_math("a", "What is 1+1?")], [_math("b", "What is 1+2?")])
    assert normalize_problem("Ｆind $X$\n y") == normalize_problem("find x y")


def test_copies_that_differ_in_dollar_placement_or_a_diagram_are_the_same_problem():
    # As the MAPPA authors' AIME pool and their aime_eval_32 write the same problems.
    pool = "Circles of radii $3,$ $4,$ and $5$ meet at $P.$ Find $m+n.$ [asy] size(5cm); draw(unitcircle); [/asy]"
    copy = "Circles of radii $3$, $4$, and $5$ meet at $P$. Find $m+n$."
    assert normalize_problem(pool) == normalize_problem(copy)
    with pytest.raises(DataOverlapError, match="'eval/7' has the same problem text as train 'aime/2022-I-11'"):
        check_no_overlap([_math("aime/2022-I-11", pool)], [_math("eval/7", copy)])
    assert normalize_problem("Find $x$. [asy] dot((0,0)); [/asy] Then find $y$.") != normalize_problem("Find $x$.")


def test_refuses_data_science_task_sharing_a_directory():
    def ds(task_id, prompt):
        files = DataScienceFiles("/data/tasks/house", "/data/answers/house.csv", "y", "id",
                                 ("rmse", "mae"))
        return Task(task_id, "datascience", "regression", prompt, data_science=files)
    with pytest.raises(DataOverlapError, match="same task directory as train 'train/house'"):
        check_no_overlap([ds("train/house", "Predict prices.")],
                         [ds("eval/house", "Other words.")])
