"""Slow tier: what README.md says about the code stays true after the code changes.

- Exercises: each row of the README's Exercises table names an edit to lladapter.py (its first code span is replaced
  by its second) and the fast-tier tests it breaks. The edit is applied to a copy of the reference, the fast tier
  runs against the copy, and exactly the tests the row names must fail.
- Reading order: each item "`file.py` N-M ..." must span the definitions it names in backticks, every one of them.
"""
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.fixtures import ROOT
from tests.test_fast_tier import fast_tier_copy

README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title):
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def exercises():
    """(name, old, new, tests it fails) for each row of the Exercises table."""
    rows = []
    for line in section("Exercises").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or not cells[1].startswith("`"):
            continue  # the header, its rule, or text around the table
        edit = re.findall(r"`([^`]+)`", cells[1])
        rows.append((cells[0], edit[0], edit[1], sorted(re.findall(r"`(test_\w+)`", cells[-1]))))
    return rows


def failing_fast_tests(folder):
    """The names of the fast-tier tests that fail in `folder` (parametrized cases under their function's name)."""
    report = folder / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_lladapter.py",
                    f"--junitxml={report}"], cwd=folder, capture_output=True, text=True, timeout=600)
    cases = ET.parse(report).getroot().iter("testcase")
    return sorted({c.get("name").split("[")[0] for c in cases
                   if c.find("failure") is not None or c.find("error") is not None})


def test_the_readme_lists_exercises():
    assert len(exercises()) >= 5, "the README's Exercises table lost its rows, or its format changed"


@pytest.mark.parametrize("name, old, new, expected", exercises(), ids=[e[0] for e in exercises()])
def test_each_exercise_fails_exactly_the_tests_the_readme_names(tmp_path, name, old, new, expected):
    fast_tier_copy(tmp_path)  # the reference, the fast tier and what it reads
    source = (tmp_path / "lladapter.py").read_text(encoding="utf-8")
    assert source.count(old) == 1, f"exercise {name!r}: `{old}` should occur exactly once in lladapter.py"
    (tmp_path / "lladapter.py").write_text(source.replace(old, new), encoding="utf-8")
    assert failing_fast_tests(tmp_path) == expected, f"exercise {name!r}: the README names other failing tests"


def reading_order():
    """(file, first line, last line, names) for each item of the README's reading order."""
    items = re.findall(r"^\d+\. `(\w+\.py)` (\d+)-(\d+)(.*?)(?=^\d+\. |\Z)", section("Read the code in this order"),
                       re.M | re.S)
    return [(file, int(a), int(b), re.findall(r"`(\w+)`", text)) for file, a, b, text in items]


def test_the_reading_order_points_at_the_definitions_it_names():
    items = reading_order()
    assert len(items) >= 6, "the README's reading order lost its items, or its format changed"
    for file, first, last, names in items:
        lines = (ROOT / file).read_text(encoding="utf-8").splitlines()
        for name in names:  # each a def, a class, or an assignment or dataclass field (`name: type = ...`)
            where = [i + 1 for i, line in enumerate(lines)
                     if re.match(rf"\s*(def|class) {name}\b|\s*{name}(: [^=]+)? = ", line)]
            assert where, f"README: {file} {first}-{last} names `{name}`, which {file} does not define"
            assert any(first <= n <= last for n in where), \
                f"README: {file} {first}-{last} names `{name}`, defined at line(s) {where}"
