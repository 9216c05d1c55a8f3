"""Pull the final answer out of LaTeX text: the content of the last \\boxed{...}."""
from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at text[open_index] ('{'), or None if never closed.

    Escaped braces (\\{ and \\}) are literal characters in LaTeX, so they do not nest.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:i]
        i += 1
    return None


def _box_content_at(text: str, end_of_command: int) -> str | None:
    rest = text[end_of_command:]
    stripped = rest.lstrip()
    start = end_of_command + len(rest) - len(stripped)
    if stripped.startswith("{"):
        return _braced_content(text, start)
    # `\boxed 5` (no braces) boxes a single token.
    if rest[:1].isspace():
        token = re.match(r"[^\s$\\]+", stripped)
        return token.group(0) if token else None
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last well-formed \\boxed{...} (or \\fbox{...}) in text, stripped.

    Nested braces are matched. A trailing \\boxed that is never closed (a truncated generation)
    is skipped in favour of the last complete one. Returns None when there is none.
    """
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _box_content_at(text, match.end())
        if content is not None:
            return content.strip()
    return None
