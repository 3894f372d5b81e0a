"""Run every runnable block of one Markdown page, in order, the way a reader following the page would.

    python tests/docs_runner.py PAGE.md      (from the folder the page's commands should run in)

- ```` ```python ```` blocks run in one namespace per page (a reader's Python session), so a block may
  use what an earlier block defined. If an unlabelled block follows directly (only blank lines
  between), it is the expected output: the printed text, or ``module.Error: message`` when the block
  raises. A block that raises without showing that is a failure.
- ```` ```bash ```` blocks run with ``bash -e -o pipefail``. A leading ``pip install ... &&`` is dropped:
  the package under test is installed already (CI runs the install commands itself).
- Unlabelled blocks whose lines start with ``$ `` are transcripts: each command runs and its output
  (stdout and stderr) must equal the lines shown under it; a line ``...`` stands for any lines.
- ``<!-- doc-test: skip REASON -->`` on the line before a block skips it (the reason is required);
  ``<!-- doc-test: write FILE -->`` writes the block (a config, say) to FILE for the blocks after it;
  ``<!-- doc-test: needs dot -->`` skips a block that draws with Graphviz when ``dot`` is not installed,
  unless PHASETRAIN_REQUIRE_GRAPHVIZ is set (CI sets it: there the block must run).

Exit status 0 and ``N blocks ran`` when everything matched; otherwise the first mismatch, with its line.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"<!-- doc-test: (\w+)(?: (.+?))? -->")
PIP_PREFIX = re.compile(r"^pip install [^&]*&&\s*", re.MULTILINE)


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    marker: tuple[str, str] | None  # (kind, argument) of a doc-test comment right before it
    output: str | None = None  # an unlabelled block right after it


def blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    found: list[Block] = []
    i, previous_end = 0, -1
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, lang, start = len(fence[1]), fence[2], i
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        marker = MARKER.search(lines[start - 1]) if start > 0 else None
        block = Block(lang, "\n".join(body) + "\n", start + 1, (marker[1], marker[2] or "") if marker else None)
        previous = found[-1] if found else None
        between = lines[previous_end + 1: start] if previous else []
        if previous and previous.lang == "python" and lang == "" and not any(x.strip() for x in between) \
                and not block.code.startswith("$ "):
            previous.output = block.code
        else:
            found.append(block)
        previous_end = i
        i += 1
    return found


def matches(expected: str, actual: str) -> bool:
    """Line by line, ignoring trailing spaces; an expected line ``...`` matches any number of lines."""
    pattern = "\n".join(".*?" if line.strip() == "..." else re.escape(line.rstrip())
                        for line in expected.strip("\n").splitlines())
    actual = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


def run_python(block: Block, namespace: dict[str, object]) -> str | None:
    out = io.StringIO()
    raised = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, f"<block at line {block.line}>", "exec"), namespace)  # noqa: S102
    except Exception as exc:  # noqa: BLE001 - the page says whether it should raise
        raised = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        if block.output is None:
            return f"raised {raised}\n{traceback.format_exc()}"
    if block.output is None:
        return None
    shown = raised if raised is not None else out.getvalue()
    return None if matches(block.output, shown) else f"expected:\n{block.output}\ngot:\n{shown}"


def run_bash(code: str) -> tuple[int, str]:
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], capture_output=True, text=True, check=False)
    return result.returncode, result.stdout + result.stderr


def run_transcript(block: Block) -> str | None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    for command, expected in commands:
        _, output = run_bash(command)
        if not matches("\n".join(expected), output):
            return f"$ {command}\nexpected:\n" + "\n".join(expected) + f"\ngot:\n{output}"
    return None


def main(page: str) -> int:
    sys.path.insert(0, os.getcwd())  # as in a Python session started in the project folder
    namespace: dict[str, object] = {"__name__": "__main__"}
    ran, started = 0, time.perf_counter()
    with open(page) as file:
        page_blocks = blocks(file.read())
    for block in page_blocks:
        if block.marker and block.marker[0] == "skip":
            if not block.marker[1]:
                return _fail(page, block, "a doc-test skip marker needs a reason")
            continue
        if block.marker == ("needs", "dot") and not graphviz_required_or_present():
            continue
        if block.marker and block.marker[0] == "write":
            with open(block.marker[1], "w") as file:
                file.write(block.code)
            problem = None
        elif block.lang == "python":
            problem = run_python(block, namespace)
        elif block.lang in ("bash", "sh"):
            status, output = run_bash(PIP_PREFIX.sub("", block.code))
            problem = f"exit status {status}:\n{output}" if status else None
        elif block.lang == "" and block.code.startswith("$ "):
            problem = run_transcript(block)
        else:
            continue
        if problem:
            return _fail(page, block, problem)
        ran += 1
        if os.environ.get("DOCS_RUNNER_TIMES"):
            print(f"line {block.line}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        started = time.perf_counter()
    print(f"{ran} blocks ran")
    return 0


def graphviz_required_or_present() -> bool:
    return bool(os.environ.get("PHASETRAIN_REQUIRE_GRAPHVIZ")) or shutil.which("dot") is not None


def _fail(page: str, block: Block, problem: str) -> int:
    print(f"{page}:{block.line}: {block.lang or 'transcript'} block:\n{block.code}\n{problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
