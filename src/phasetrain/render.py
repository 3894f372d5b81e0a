"""Draw the phase graph: Mermaid and DOT text need nothing; SVG and PNG need Graphviz's ``dot`` program."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from phasetrain.errors import PhasetrainError
from phasetrain.graph import FIRST, LAST, Edge, PhaseGraph
from phasetrain.phases import default_phases
from phasetrain.run_folder import atomic_path

FORMATS = ("mermaid", "dot", "svg", "png")
SUFFIXES = {".mmd": "mermaid", ".mermaid": "mermaid", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}
BUILT_IN = frozenset(phase.name for phase in default_phases())


class RenderError(PhasetrainError):
    """A diagram cannot be produced (unknown format, or Graphviz's ``dot`` is missing)."""


def render(graph: PhaseGraph, fmt: str = "mermaid", highlight: str | None = None) -> str | bytes:
    """Text for ``mermaid``/``dot``, image bytes for ``svg``/``png``; ``highlight`` marks one phase."""
    if fmt not in FORMATS:
        raise RenderError(f"unknown diagram format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "mermaid":
        return to_mermaid(graph, highlight)
    dot_text = to_dot(graph, highlight)
    return dot_text if fmt == "dot" else run_dot(dot_text, fmt)


def write(graph: PhaseGraph, path: pathlib.Path, fmt: str | None = None, highlight: str | None = None) -> pathlib.Path:
    """Write the diagram to ``path``; the format comes from ``fmt`` or the file suffix."""
    content = render(graph, fmt or format_of(path), highlight)
    with atomic_path(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def draw(graph: PhaseGraph, path: str | os.PathLike[str] | None, fmt: str | None,
         highlight: str | None) -> str | bytes | pathlib.Path:
    """``render`` (Mermaid by default) without a path; ``write`` to ``path`` (returning it) with one."""
    if path is None:
        return render(graph, fmt or "mermaid", highlight)
    return write(graph, pathlib.Path(path), fmt, highlight)


def format_of(path: pathlib.Path) -> str:
    if path.suffix.lower() not in SUFFIXES:
        raise RenderError(f"cannot tell the diagram format from {path.name!r}; use one of the suffixes "
                          f"{', '.join(SUFFIXES)} or pass format=")
    return SUFFIXES[path.suffix.lower()]


def edge_label(graph: PhaseGraph, edge: Edge) -> str:
    """The condition's label; an unconditional edge after conditional ones is the 'else' branch."""
    if edge.condition is not None:
        return edge.condition.label
    return "else" if len(graph.edges_from(edge.source)) > 1 else ""


def to_mermaid(graph: PhaseGraph, highlight: str | None = None) -> str:
    """Mermaid ``stateDiagram-v2`` text."""
    lines = ["stateDiagram-v2", f"    [*] --> {FIRST}"]
    for edge in graph.edges:
        label = edge_label(graph, edge)
        lines.append(f"    {edge.source} --> {edge.dest}" + (f": {label}" if label else ""))
    lines.append(f"    {LAST} --> [*]")
    if highlight:
        lines += ["    classDef current fill:#ffcc80,stroke:#e65100,stroke-width:3px", f"    class {highlight} current"]
    return "\n".join(lines) + "\n"


def to_dot(graph: PhaseGraph, highlight: str | None = None) -> str:
    """Graphviz DOT text (needs no Graphviz to produce; ``dot`` turns it into SVG/PNG)."""
    lines = ["digraph phases {", "    rankdir=LR;",
             '    node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];',
             "    __start__ [shape=point, width=0.15];", f"    __start__ -> {FIRST};"]
    for name in graph.names:
        attrs = ['fillcolor="#ffcc80"', "penwidth=3"] if name == highlight else []
        if name == LAST:
            attrs.append("peripheries=2")
        if name not in BUILT_IN and name != highlight:
            attrs.append('fillcolor="#e8f5e9"')
        lines.append(f"    {name}" + (f" [{', '.join(attrs)}];" if attrs else ";"))
    for edge in graph.edges:
        label = edge_label(graph, edge)
        lines.append(f"    {edge.source} -> {edge.dest}" + (f' [label="{label}"];' if label else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def run_dot(dot_text: str, fmt: str) -> bytes:
    if shutil.which("dot") is None:
        raise RenderError(f"rendering {fmt} needs Graphviz's 'dot' program, which is not installed: "
                          "install the 'graphviz' package (apt-get install graphviz, brew install graphviz, "
                          "conda install graphviz), or use format 'mermaid' or 'dot'")
    result = subprocess.run(["dot", f"-T{fmt}"], input=dot_text.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"dot -T{fmt} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
