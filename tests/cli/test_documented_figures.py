"""Every measured time in README.md and docs/*.md names the machine it was measured on (issue 23,
item 7). A time is a number with a unit of time (`958 s`, `4.3-4.5 s`, `8.7 min`, `3 minutes`);
the paragraph it stands in (for a table row: the table and the paragraph just before it) must
name the machine: a word among core, CPU, GPU, H100, H200, A100, machine. Fenced code is not
read. A time followed by "by default" is a setting, not a measurement.

What this cannot check: that the paragraph also gives the command that produced the figure (an
exact command line, or the benchmark script and its section of benchmarks/README.md), and any
figure that is not a time (a speed-up, memory, a score). Those were audited by hand.
benchmarks/README.md is not read: its "Machine" section applies to every section below it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIME = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[-–]\d+(?:\.\d+)?)? ?(?:s|min|minutes|seconds|hours?)\b(?!/)"
                  r"(?! by default)")
MACHINE = re.compile(r"core|CPU|GPU|H100|H200|A100|machine", re.IGNORECASE)


def paragraphs(text: str) -> list[str]:
    """The text's blocks between blank lines, fenced code left out."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            line = ""
        if fenced or not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def times_without_a_machine(text: str) -> list[str]:
    """Each time whose paragraph (a table: with the paragraph before it) names no machine."""
    found, before = [], ""
    for block in paragraphs(text):
        is_table = block.startswith("|")
        context = f"{before}\n{block}" if is_table else block
        if not MACHINE.search(context):
            found += [block[max(0, m.start() - 60):m.end() + 20].replace("\n", " ") for m in TIME.finditer(block)]
        if not is_table:
            before = block
    return found


def test_the_rule_finds_a_time_without_its_machine_and_accepts_one_with_it():
    assert times_without_a_machine("The whole run took 958 s.\n\nIt took 4.3-4.5 s on 2 cores.") == [
        "The whole run took 958 s."]
    assert times_without_a_machine("Measured on 2 CPU cores:\n\n| step | time |\n| --- | --- |\n| train | 680 s |") == []
    assert times_without_a_machine("| step | time |\n| --- | --- |\n| train | 680 s |") != []
    assert times_without_a_machine("```bash\nsleep 5 s\n```\n\nSLURM waits 30 s by default.") == []
    assert times_without_a_machine("DiT-XL/2 at 256 px, 50 000 samples, 250 steps, cfg 1.5.") == []


def test_the_docs_hold_measured_times_to_check():
    assert any(TIME.search(doc.read_text()) for doc in DOCS)
    assert "958 s" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_measured_time_names_its_machine(doc):
    missing = times_without_a_machine(doc.read_text())
    assert not missing, (f"{doc.name}: a measured time without the machine it was measured on (say which, and "
                         f"the command that produced it) in: {missing}")
