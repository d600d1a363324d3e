"""Every code block of README.md and docs/ runs as written, offline, on the bundled demo.

Blocks run page by page, in order, in one namespace per page (a later block may use the names of an
earlier one), in a temporary working directory (each block is also written there as a file: nnsight
reads a trace's body back from its source file). A block that cannot run here is marked on the line
before its fence with ``<!-- docs-test: skip: REASON -->`` (e.g. it needs a hub model, a GPU or
NDIF) and is reported as skipped with that reason; any other language than python must be marked.
Each page's first python block runs (the offline demo block every page opens with).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->\s*$")


def blocks(page: Path) -> list[dict]:
    """The fenced code blocks of ``page``: language, first line number, source, skip reason or None."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(before)
        found.append({"lang": match.group(1), "line": start + 1, "source": "\n".join(body) + "\n",
                      "skip": skip.group(1) if skip else None})
        i += 1
    return found


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


SKIPPED = [(page, block) for page in PAGES for block in blocks(page) if block["skip"]]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = blocks(page)
    unmarked = [b["line"] for b in found if b["lang"] != "python" and not b["skip"]]
    assert not unmarked, f"{_name(page)}: non-python blocks at lines {unmarked} need a docs-test skip marker"
    python = [b for b in found if b["lang"] == "python"]
    if python:
        assert python[0]["skip"] is None, f"{_name(page)}: its first python block must run offline on the demo"
    namespace: dict = {"__name__": "__docs__"}
    for block in python:
        if block["skip"]:
            continue
        # a file on disk per block: nnsight reads a trace's `with` body back from its source file
        script = tmp_path / f"{page.stem}_line{block['line']}.py"
        script.write_text(block["source"], encoding="utf-8")
        code = compile(block["source"], str(script), "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # name the page and line of the failing block
            raise AssertionError(f"{_name(page)} block at line {block['line']} failed: {error!r}") from error
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("page, block", SKIPPED, ids=[f"{_name(p)}:{b['line']}" for p, b in SKIPPED])
def test_marked_block(page, block):
    """A marked block is compiled (python) and skipped with its reason."""
    if block["lang"] == "python":
        compile(block["source"], f"{_name(page)}:{block['line']}", "exec")
    pytest.skip(f"{_name(page)}:{block['line']}: {block['skip']}")
