"""Render the phase graph: Mermaid and DOT text need nothing; SVG and PNG need Graphviz's ``dot`` program."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

from phasetrain.errors import PhasetrainError
from phasetrain.graph import PhaseGraph
from phasetrain.run_folder import atomic_path

FORMATS = ("mermaid", "dot", "svg", "png")
SUFFIXES = {".mmd": "mermaid", ".mermaid": "mermaid", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}


class RenderError(PhasetrainError):
    """A diagram cannot be produced (unknown format, or Graphviz's ``dot`` is missing)."""


def render(graph: PhaseGraph, fmt: str, highlight: str | None = None) -> str | bytes:
    """Text for ``mermaid``/``dot``, image bytes for ``svg``/``png``."""
    if fmt not in FORMATS:
        raise RenderError(f"unknown diagram format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "mermaid":
        return graph.to_mermaid(highlight)
    dot_text = graph.to_dot(highlight)
    return dot_text if fmt == "dot" else run_dot(dot_text, fmt)


def write(graph: PhaseGraph, path: pathlib.Path, fmt: str | None = None, highlight: str | None = None) -> pathlib.Path:
    """Write the diagram to ``path``; the format comes from ``fmt`` or the file suffix."""
    fmt = fmt or format_of(path)
    content = render(graph, fmt, highlight)
    with atomic_path(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def format_of(path: pathlib.Path) -> str:
    if path.suffix.lower() not in SUFFIXES:
        raise RenderError(f"cannot tell the diagram format from {path.name!r}; use one of the suffixes "
                          f"{', '.join(SUFFIXES)} or pass format=")
    return SUFFIXES[path.suffix.lower()]


def run_dot(dot_text: str, fmt: str) -> bytes:
    if shutil.which("dot") is None:
        raise RenderError(f"rendering {fmt} needs Graphviz's 'dot' program, which is not installed: "
                          "install the 'graphviz' package (apt-get install graphviz, brew install graphviz, "
                          "conda install graphviz), or use format 'mermaid' or 'dot'")
    result = subprocess.run(["dot", f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"dot -T{fmt} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
