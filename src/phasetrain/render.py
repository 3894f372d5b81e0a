"""Draw the phase graph: Mermaid and DOT text need nothing; SVG and PNG need Graphviz's ``dot`` program.

Everything is drawn from a ``GraphView``: the phase names and the labelled edges, plain data. A live
``PhaseGraph`` gives one (``describe``), and so does a run folder's ``graph.json`` (``GraphView.read``),
which lets ``phasetrain graph RUN_DIR`` draw a run without importing (so running) any of its phases.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from phasetrain.errors import PhasetrainError, RunDirError
from phasetrain.graph import FIRST, LAST, Edge, PhaseGraph
from phasetrain.phases import default_phases
from phasetrain.run_folder import atomic_path

FORMATS = ("mermaid", "dot", "svg", "png")
SUFFIXES = {".mmd": "mermaid", ".mermaid": "mermaid", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".png": "png"}
BUILT_IN = frozenset(phase.name for phase in default_phases())


class RenderError(PhasetrainError):
    """A diagram cannot be produced (unknown format, or Graphviz's ``dot`` is missing)."""


@dataclass(frozen=True)
class DrawnEdge:
    """``source -> dest`` with the text drawn on it ("" for a phase's only way out)."""

    source: str
    dest: str
    label: str


@dataclass(frozen=True)
class GraphView:
    """What a diagram shows of a phase graph, and what a run folder stores of it (``graph.json``)::

        {"version": 1, "phases": ["setup", "train_epoch", ...],
         "edges": [{"source": "train_epoch", "dest": "eval_epoch", "label": "eval_due"}, ...]}

    Conditions are stored as their labels only: a stored graph can be drawn, not walked.
    """

    names: tuple[str, ...]
    edges: tuple[DrawnEdge, ...]

    def to_json(self) -> str:
        edges = [{"source": e.source, "dest": e.dest, "label": e.label} for e in self.edges]
        return json.dumps({"version": VIEW_VERSION, "phases": list(self.names), "edges": edges}, indent=1) + "\n"

    @classmethod
    def read(cls, path: pathlib.Path) -> GraphView:
        """The graph stored at ``path``; a file this version cannot read is a RunDirError naming it."""
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VIEW_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VIEW_VERSION}")
            return cls(tuple(_strings(data["phases"])), tuple(_drawn_edge(edge) for edge in data["edges"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"no key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RunDirError(f"{path} is not a phase graph this phasetrain can read ({reason}); draw the graph from "
                              f"the run's config instead: phasetrain graph {path.parent / 'config.yaml'}") from None


VIEW_VERSION = 1
"""Of graph.json's layout; bump it when the layout changes, so an old reader refuses a new file."""


def _strings(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"expected a list of strings, got {values!r}")
    return values


def _drawn_edge(edge: Any) -> DrawnEdge:
    source, dest, label = _strings([edge["source"], edge["dest"], edge["label"]])
    return DrawnEdge(source, dest, label)


def describe(graph: PhaseGraph | GraphView) -> GraphView:
    """The ``GraphView`` of a live graph (a view is returned as it is): the edges that can be taken, so an
    unconditional edge added before a phase's other ways out (``add_phase`` with no condition) hides them."""
    if isinstance(graph, GraphView):
        return graph
    return GraphView(tuple(graph.names),
                     tuple(DrawnEdge(e.source, e.dest, edge_label(graph, e)) for e in graph.live_edges()))


def render(graph: PhaseGraph | GraphView, fmt: str = "mermaid", highlight: str | None = None) -> str | bytes:
    """Text for ``mermaid``/``dot``, image bytes for ``svg``/``png``; ``highlight`` marks one phase."""
    if fmt not in FORMATS:
        raise RenderError(f"unknown diagram format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "mermaid":
        return to_mermaid(graph, highlight)
    dot_text = to_dot(graph, highlight)
    return dot_text if fmt == "dot" else run_dot(dot_text, fmt)


def write(graph: PhaseGraph | GraphView, path: pathlib.Path, fmt: str | None = None,
          highlight: str | None = None) -> pathlib.Path:
    """Write the diagram to ``path``; the format comes from ``fmt`` or the file suffix."""
    content = render(graph, fmt or format_of(path), highlight)
    with atomic_path(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def draw(graph: PhaseGraph | GraphView, path: str | os.PathLike[str] | None, fmt: str | None,
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
    return "else" if graph.edges_from(edge.source)[0] != edge else ""


def to_mermaid(graph: PhaseGraph | GraphView, highlight: str | None = None) -> str:
    """Mermaid ``stateDiagram-v2`` text."""
    lines = ["stateDiagram-v2", f"    [*] --> {FIRST}"]
    for edge in describe(graph).edges:
        lines.append(f"    {edge.source} --> {edge.dest}" + (f": {edge.label}" if edge.label else ""))
    lines.append(f"    {LAST} --> [*]")
    if highlight:
        lines += ["    classDef current fill:#ffcc80,stroke:#e65100,stroke-width:3px", f"    class {highlight} current"]
    return "\n".join(lines) + "\n"


def to_dot(graph: PhaseGraph | GraphView, highlight: str | None = None) -> str:
    """Graphviz DOT text (needs no Graphviz to produce; ``dot`` turns it into SVG/PNG)."""
    view = describe(graph)
    lines = ["digraph phases {", "    rankdir=LR;",
             '    node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];',
             "    __start__ [shape=point, width=0.15];", f"    __start__ -> {FIRST};"]
    for name in view.names:
        attrs = ['fillcolor="#ffcc80"', "penwidth=3"] if name == highlight else []
        if name == LAST:
            attrs.append("peripheries=2")
        if name not in BUILT_IN and name != highlight:
            attrs.append('fillcolor="#e8f5e9"')
        lines.append(f"    {name}" + (f" [{', '.join(attrs)}];" if attrs else ";"))
    for edge in view.edges:
        lines.append(f"    {edge.source} -> {edge.dest}" + (f' [label="{edge.label}"];' if edge.label else ";"))
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
