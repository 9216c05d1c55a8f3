"""extract_code_cells: which fenced blocks of an agent's text are executed."""
from mappa_jax.tools import extract_code_cells, strip_thinking


def test_python_py_and_bare_fences_in_order():
    text = ("Plan first.\n```python\na = 1\n```\nthen\n```py\nb = 2\n```\n"
            "and\n```\nc = 3\n```\n```Python3\nd = 4\n```\n")
    assert extract_code_cells(text) == ["a = 1\n", "b = 2\n", "c = 3\n", "d = 4\n"]


def test_other_languages_are_skipped_whole():
    # The bash block's closing fence must not open a new bare block.
    text = "```bash\nls -la\n```\n```text\nprint('no')\n```\n```python\nx = 1\n```\n"
    assert extract_code_cells(text) == ["x = 1\n"]


def test_code_inside_think_is_never_returned():
    text = ("<think>\nMaybe:\n```python\nimport shutil; shutil.rmtree('/')\n```\n</think>\n"
            "Answer:\n```python\nprint('ok')\n```\n")
    assert extract_code_cells(text) == ["print('ok')\n"]


def test_unopened_think_at_start_hides_everything_before_its_close():
    # Chat templates of reasoning models open <think> in the prompt; the generation only closes it.
    text = "thinking...\n```python\nbad()\n```\n</think>\n```python\ngood()\n```\n"
    assert extract_code_cells(text) == ["good()\n"]


def test_unclosed_think_hides_the_rest():
    text = "```python\nfirst()\n```\n<think>\n```python\nhidden()\n```\n"
    assert extract_code_cells(text) == ["first()\n"]


def test_several_think_regions_and_case():
    text = ("<THINK>```python\nno1()\n```</THINK>\n```python\nyes1()\n```\n"
            "<think>\n```python\nno2()\n```\n</think>\n```python\nyes2()\n```\n")
    assert extract_code_cells(text) == ["yes1()\n", "yes2()\n"]
    assert "no2" not in strip_thinking(text)


def test_indented_blocks_are_dedented_and_empty_or_unclosed_dropped():
    text = "1. Load:\n   ```python\n   import os\n   print(os.sep)\n   ```\n```python\n\n```\n```python\ncut off"
    assert extract_code_cells(text) == ["import os\nprint(os.sep)\n"]


def test_longer_fences_keep_inner_triple_backticks():
    text = "````python\ns = '''\n```\n'''\n````\n"
    assert extract_code_cells(text) == ["s = '''\n```\n'''\n"]


def test_no_code():
    assert extract_code_cells("The answer is \\boxed{4}.") == []
