"""Rule-based math grading: last \\boxed{} of the response, checked with math-verify."""
import threading

import pytest

from mappa_jax.eval import answers_match, grade_math
from mappa_jax.eval.math_grading import CORRECT, NO_BOXED_ANSWER, WRONG


@pytest.mark.parametrize("response, truth, correct", [
    (r"Draft says \boxed{3}. Verified: the answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"Draft says \boxed{\frac{1}{2}}. Verified: \boxed{3}.", "0.5", False),  # last box counts
    (r"\boxed{033}", "33", True),  # AIME answers with a leading zero
    (r"\boxed{\sqrt{18}}", r"3\sqrt{2}", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{1+x^2}", "x^2+1", True),
    (r"\boxed{\{1, 2\}}", r"\{2,1\}", True),
    (r"\boxed{204}", "240", False),
    (r"\boxed{3.14159}", r"\pi", False),
])
def test_grade_math(response, truth, correct):
    grade = grade_math(response, truth)
    assert grade.correct is correct
    assert grade.reason == (CORRECT if correct else WRONG)


def test_missing_or_unclosed_box_is_wrong_with_reason():
    grade = grade_math("The answer is 42.", "42")
    assert (grade.correct, grade.extracted, grade.reason) == (False, None, NO_BOXED_ANSWER)
    grade = grade_math(r"\boxed{7} ... final \boxed{42", "42")  # truncated final box
    assert (grade.correct, grade.extracted) == (False, "7")


def test_grading_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_match("0.25", r"\frac14")))
    thread.start()
    thread.join()
    assert results == [True]
