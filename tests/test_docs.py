"""Every runnable block of README.md and docs/*.md runs, in a fresh copy of the project, as a reader would run it.

Each page runs in its own temporary project folder (examples/, diagrams/, benchmarks/ and the pages). For
the docs pages the folder already holds a finished ``runs/digits``, as it does after the README's quick
start, so an example that writes to the quick start's run folder fails here as it would for a reader.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from tests.docs_runner import blocks, matches

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Pages whose blocks launch several processes: tests/test_distributed.py runs them, with the suite's other
#: launches (two launches at once on a 2-core machine lose a process to gloo timeouts).
MULTI_PROCESS_PAGES = ["docs/distributed.md"]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
                              if str(p.relative_to(ROOT)) not in MULTI_PROCESS_PAGES)]


def project_copy(folder: pathlib.Path) -> pathlib.Path:
    for name in ("examples", "diagrams", "benchmarks", "docs"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", folder / "README.md")
    return folder


@pytest.fixture(scope="module")
def after_quick_start(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A finished runs/digits from the README's quick start command."""
    project = project_copy(tmp_path_factory.mktemp("quick-start"))
    result = subprocess.run(["phasetrain", "run", "examples/digits.yaml"], cwd=project, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    return project / "runs" / "digits"


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory, after_quick_start: pathlib.Path
              ) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Every page running in its own project folder, two at a time (the pages are independent)."""
    def run(page: str) -> subprocess.CompletedProcess[str]:
        project = project_copy(tmp_path_factory.mktemp("page"))
        if page != "README.md":
            shutil.copytree(after_quick_start, project / "runs" / "digits")
        return subprocess.run([sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(ROOT / page)], cwd=project,
                              capture_output=True, text=True, check=False, timeout=600)

    pool = ThreadPoolExecutor(max_workers=2)
    yield {page: pool.submit(run, page) for page in PAGES}
    pool.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_runnable_block_of_the_page_runs(page: str, page_runs: dict[str, Future[Any]]) -> None:
    result = page_runs[page].result()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_the_runner_pairs_code_with_its_output_and_reads_markers() -> None:
    lines = ["```python", "print(1)", "```", "", "```", "1", "```",
             "Some prose.", "```", "not output: prose came between", "```",
             "<!-- doc-test: skip needs a GPU -->", "```bash", "nvidia-smi", "```",
             "```", "$ echo hi", "hi", "```"]
    page = "\n".join(lines)
    found = blocks(page)
    assert [(b.lang, b.line, b.output, b.marker) for b in found] == [
        ("python", 1, "1\n", None), ("", 9, None, None), ("bash", 13, None, ("skip", "needs a GPU")),
        ("", 16, None, None)]
    assert matches("a\n...\nd", "a\nb\nc\nd") and not matches("a\nd", "a\nb\nd")


RUN_DIR = re.compile(r"run_dir(?:=|\": \"|=\")(runs/[\w.-]+)")


def test_doc_examples_never_share_a_run_folder() -> None:
    """A reader runs the pages one after another in one project folder: two examples writing the same run
    folder would collide ('already holds a finished run'). runs/digits belongs to the quick start."""
    writers: dict[str, list[str]] = {}
    for page in PAGES:
        for block in blocks((ROOT / page).read_text()):
            runnable = block.lang in ("python", "bash") or block.code.startswith("$ ")
            for run_dir in RUN_DIR.findall(block.code) if runnable else []:
                writers.setdefault(run_dir, []).append(f"{page}:{block.line}")
    shared = {run_dir: places for run_dir, places in writers.items() if len(places) > 1}
    assert not shared, shared
    assert "runs/digits" not in writers


def test_ci_runs_the_readme_test_command_on_the_whole_suite() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests:.*?```bash\n(.+?)\n```", readme, re.DOTALL)
    assert command and "python -m pytest" in command[1]
    options = command[1].split("python -m pytest", 1)[1].split()
    assert "-m" not in options and "-k" not in options  # no filter: CI runs the slow tests too
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash -c "$readme_test_command"' in ci and "set -euo pipefail" in ci
    assert not re.search(r"^[^#\n]*\S &&", ci, re.MULTILINE)  # no && chain whose failure set -e would ignore
