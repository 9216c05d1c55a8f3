"""The README's comparison tables quote docs/benchmarks.md: every median (min-max) figure and every
ratio in them must appear in the report (each ratio on its peer's row) that `python benchmarks/compare.py` wrote, and the README
must name the commit the report was measured at. Catches a report regenerated without the README
following it (or the reverse)."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tables of "Measured on this project's 2-core CPU machine" whose rows come from the report.
TABLE_HEADERS = ("| system | batch 8 | batch 32 |", "| model | mappa_jax update, tokens/s |")
FIGURE = re.compile(r"\d+(?:\.\d+)? \(\d+(?:\.\d+)?-\d+(?:\.\d+)?\)|\d+\.\d+x")


def _table_rows(readme: str, header: str) -> list[str]:
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        pytest.fail(f"README.md has no table starting {header!r}")
    rows = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_tables_quote_the_current_report():
    """Every figure is in the report, and every ratio on the report's row of the figure before it
    (the peer's median it divides), so a ratio copied from another row or section fails too."""
    readme = (ROOT / "README.md").read_text()
    report_lines = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
    checked, missing = 0, []
    for header in TABLE_HEADERS:
        for row in _table_rows(readme, header):
            median = None
            for figure in FIGURE.findall(row):
                is_ratio = figure.endswith("x")
                key = median if is_ratio and median else figure
                lines = [line for line in report_lines if key in line]
                if not any(figure in line for line in lines):
                    missing.append(f"{figure!r} in {row[:60]!r}")
                median = median if is_ratio else figure
                checked += 1
    assert checked >= 20, "the README's comparison tables lost their figures"
    assert not missing, "README figures not in docs/benchmarks.md (ratios: not on their peer's row):\n" + "\n".join(missing)


def test_readme_names_the_reports_commit():
    report = (ROOT / "docs" / "benchmarks.md").read_text()
    commit = re.search(r"commit ([0-9a-f]{7,40})", report.splitlines()[2])
    assert commit, "docs/benchmarks.md's third line should say which commit it was measured at"
    assert f"at {commit.group(1)}" in (ROOT / "README.md").read_text()
