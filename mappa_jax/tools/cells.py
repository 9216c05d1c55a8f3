"""Finding the code an agent asked to run: fenced Python blocks outside its reasoning."""
import re
import textwrap

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
# A fence line: ``` (or more backticks) then an optional info string such as "python".
_FENCE_LINE = re.compile(r"^[ \t]*(?P<ticks>`{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
_PYTHON_INFO = {"", "python", "python3", "py"}


def strip_thinking(text: str) -> str:
    """Removes every <think>...</think> region.

    Reasoning models often start generating inside a <think> opened by the chat template, so a
    </think> with no <think> before it closes a region that starts at the beginning of the text.
    A <think> that is never closed hides everything after it.
    """
    first_close = _THINK_CLOSE.search(text)
    first_open = _THINK_OPEN.search(text)
    if first_close and (first_open is None or first_close.start() < first_open.start()):
        text = text[first_close.end():]
    visible = []
    position = 0
    while True:
        opening = _THINK_OPEN.search(text, position)
        if opening is None:
            visible.append(text[position:])
            break
        visible.append(text[position:opening.start()])
        closing = _THINK_CLOSE.search(text, opening.end())
        if closing is None:
            break
        position = closing.end()
    # Keep line structure at the seams so a fence right after </think> still starts a line.
    return "\n".join(visible)


def ends_inside_reasoning(text: str) -> bool:
    """Whether text ends inside a <think> block that no </think> after it closes (a chat
    template's generation prompt that opens reasoning; a reply whose reasoning never closed)."""
    opens = [m.start() for m in _THINK_OPEN.finditer(text)]
    if not opens:
        return False
    last_close = max((m.start() for m in _THINK_CLOSE.finditer(text)), default=-1)
    return opens[-1] > last_close


def extract_code_cells(text: str) -> list[str]:
    """Fenced ```python / ```py / ``` blocks outside <think> regions, in order, dedented.

    Fences of other languages (```bash, ```text, ```output) are skipped whole. Blocks that are
    empty or never closed (a generation cut off mid-block) are not returned.
    """
    cells = []
    open_ticks, open_info, body = None, None, []
    for line in strip_thinking(text).splitlines():
        fence = _FENCE_LINE.match(line)
        if open_ticks is None:
            if fence:
                open_ticks, open_info, body = fence["ticks"], fence["info"].lower(), []
            continue
        # A closing fence is bare and at least as long as the opening one.
        if fence and not fence["info"] and len(fence["ticks"]) >= len(open_ticks):
            code = textwrap.dedent("\n".join(body) + "\n")
            if open_info in _PYTHON_INFO and code.strip():
                cells.append(code)
            open_ticks = None
        else:
            body.append(line)
    return cells
