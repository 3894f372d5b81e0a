"""Regenerate diagrams/ and the README's graph from the code, so pictures never drift from the loop.

    python diagrams/render.py            # write diagrams/*.mmd, *.dot, *.svg and the README block
    python diagrams/render.py --check    # exit 1 and name what is stale (tests/test_graph.py runs this)

SVGs need Graphviz's ``dot``; without it they are left as they are (and --check skips them).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phasetrain import RunConfig
from phasetrain.graph import PhaseGraph, build_graph, default_graph
from phasetrain.render import run_dot, to_dot, to_mermaid

#: diagram name -> the example config it shows (None: the default graph)
SOURCES = {"default": None, "digits": "examples/digits.yaml", "digits_test_phase": "examples/digits_test_phase.yaml"}
README_BLOCK = re.compile(r"(<!-- graph:start -->\n```mermaid\n)(.*?)(```\n<!-- graph:end -->)", re.DOTALL)


def graph(source: str | None) -> PhaseGraph:
    return default_graph() if source is None else build_graph(RunConfig.from_file(ROOT / source))


def expected() -> dict[pathlib.Path, bytes]:
    """Every generated file and its content (SVGs only where dot is installed)."""
    files: dict[pathlib.Path, bytes] = {}
    for name, source in SOURCES.items():
        g = graph(source)
        files[ROOT / "diagrams" / f"{name}.mmd"] = to_mermaid(g).encode()
        files[ROOT / "diagrams" / f"{name}.dot"] = to_dot(g).encode()
        if shutil.which("dot"):
            files[ROOT / "diagrams" / f"{name}.svg"] = run_dot(to_dot(g), "svg")
    readme = (ROOT / "README.md").read_text()
    block = to_mermaid(graph(None))
    files[ROOT / "README.md"] = README_BLOCK.sub(lambda m: m.group(1) + block + m.group(3), readme).encode()
    return files


def stale() -> list[str]:
    return [str(path.relative_to(ROOT)) for path, content in expected().items()
            if not path.exists() or path.read_bytes() != content]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    args = parser.parse_args()
    if args.check:
        names = stale()
        print("stale: " + ", ".join(names) + " (run: python diagrams/render.py)" if names else "diagrams up to date")
        return 1 if names else 0
    for path, content in expected().items():
        path.write_bytes(content)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
