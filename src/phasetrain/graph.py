"""The phase graph: phases and conditional edges, walked by a flat ``transitions`` machine.

The trainer never decides the phase order itself: after a phase's handler returns, it fires the
machine's single trigger ``advance``; the machine takes the first edge out of the current phase whose
condition holds. Transitions happen per phase, never per batch.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from transitions import Machine, State

from phasetrain.conditions import Condition, checkpoint_due, eval_due, run_finished
from phasetrain.errors import GraphError

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer

# transitions logs 3 INFO lines per transition; that is noise for users and ~30 us each.
logging.getLogger("transitions").setLevel(logging.WARNING)

DEFAULT_PHASES = ("setup", "train_epoch", "eval_epoch", "checkpoint", "done")
#: Phases whose every visit moves the epoch or optimizer step on; a cycle must pass through one.
ADVANCING_PHASES = frozenset({"train_epoch"})
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class Edge:
    """``source -> dest``, taken when ``condition`` holds (None: always). Edges out of a phase are tried in order."""

    source: str
    dest: str
    condition: Condition | None = None

    @property
    def label(self) -> str:
        return self.condition.label if self.condition else ""


class PhaseGraph:
    """Phase names and ordered edges; ``build_machine`` turns them into a transitions ``Machine``."""

    def __init__(self, phases: list[str], edges: list[Edge]) -> None:
        self.phases = phases
        self.edges = edges
        self._chains: dict[str, list[str]] = {}  # phase -> [phase, phases added after it, in order]

    @classmethod
    def default(cls) -> PhaseGraph:
        finished, evaluate, save = run_finished(), eval_due(), checkpoint_due()
        return cls(list(DEFAULT_PHASES), [
            Edge("setup", "train_epoch"),
            Edge("train_epoch", "eval_epoch", evaluate),
            Edge("train_epoch", "checkpoint", save),
            Edge("train_epoch", "done", finished),
            Edge("train_epoch", "train_epoch"),
            Edge("eval_epoch", "checkpoint", save),
            Edge("eval_epoch", "done", finished),
            Edge("eval_epoch", "train_epoch"),
            Edge("checkpoint", "done", finished),
            Edge("checkpoint", "train_epoch"),
        ])

    # ---- changing the graph ---------------------------------------------------------------------
    def add_phase(self, name: str, after: str, when: Condition | None = None, then: str | None = None) -> None:
        """Insert ``name`` after ``after``: entered when ``when`` holds, then on to what followed ``after``
        (or to ``then``, unconditionally). Phases added after the same phase run in the order they were
        added, each when its condition holds. Raises GraphError naming the problem and the phases; the
        graph is unchanged then."""
        if not _NAME.match(name):
            raise GraphError(f"phase name {name!r} must be lowercase letters, digits and '_' "
                             "(it becomes hook names like on_enter_<name>)")
        if name in self.phases:
            raise GraphError(f"a phase named {name!r} already exists; phases: {', '.join(self.phases)}")
        for role, existing in (("after", after), ("then", then)):
            if existing is not None and existing not in self.phases:
                raise GraphError(f"{role}={existing!r} names no phase; phases: {', '.join(self.phases)}")
        if after == "done":
            raise GraphError("after='done': done is final, nothing runs after it")
        if then == self.phases[0]:
            raise GraphError(f"then={then!r}: {then} runs once, at the start of the run")
        chain = self._chains.get(after, [after])  # `after` and the phases already added after it
        edges = list(self.edges)
        for member in chain:
            # Before member's continuation, after its edges into later members of the chain.
            later = chain[chain.index(member) + 1:]
            out = [i for i, e in enumerate(edges) if e.source == member]
            into_later = [i for i in out if edges[i].dest in later]
            edges.insert(into_later[-1] + 1 if into_later else out[0], Edge(member, name, when))
        continuation = [e for e in self.edges_from(after) if e.dest not in chain[1:]]
        edges += [replace(e, source=name) for e in continuation] if then is None else [Edge(name, then)]
        phases = [*self.phases[:-1], name, self.phases[-1]] if self.phases[-1] == "done" else [*self.phases, name]
        PhaseGraph(phases, edges).validate()  # check a copy: a refused phase leaves the graph as it was
        self.phases, self.edges = phases, edges
        if then is None:
            self._chains[after] = [*chain, name]

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every phase reachable from setup, done reachable from every phase, every phase has an
        unconditional way out, and no cycle that avoids train_epoch (it could repeat forever). Edges
        after a phase's first unconditional one can never be taken and do not count."""
        unknown = sorted({p for e in self.edges for p in (e.source, e.dest)} - set(self.phases))
        if unknown:
            raise GraphError(f"edges name unknown phases {unknown}; phases: {', '.join(self.phases)}")
        unreachable = [p for p in self.phases if p not in self._reachable(self.phases[0], forward=True)]
        if unreachable:
            raise GraphError(f"phases not reachable from {self.phases[0]}: {', '.join(unreachable)}")
        stuck = [p for p in self.phases if p not in self._reachable("done", forward=False)]
        if stuck:
            raise GraphError(f"done cannot be reached from: {', '.join(stuck)}")
        stalls = [p for p in self.phases if p != "done" and all(e.condition for e in self.edges_from(p))]
        if stalls:
            raise GraphError(f"phases with no unconditional way out (the run would stall when no condition "
                             f"holds): {', '.join(stalls)}")
        cycle = self._cycle_avoiding(ADVANCING_PHASES)
        if cycle:
            raise GraphError(f"cycle {' -> '.join(cycle)} never passes {', '.join(sorted(ADVANCING_PHASES))}, "
                             "so it could repeat without the epoch or step advancing")

    def live_edges(self) -> list[Edge]:
        """Edges that can ever be taken: those out of a phase up to its first unconditional one."""
        live: list[Edge] = []
        for phase in self.phases:
            for edge in self.edges_from(phase):
                live.append(edge)
                if edge.condition is None:
                    break
        return live

    def _reachable(self, start: str, forward: bool) -> set[str]:
        seen, todo = {start}, [start]
        live = self.live_edges()
        while todo:
            node = todo.pop()
            for e in live:
                a, b = (e.source, e.dest) if forward else (e.dest, e.source)
                if a == node and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    def _cycle_avoiding(self, advancing: frozenset[str]) -> list[str] | None:
        """A cycle among the phases other than ``advancing`` (as a list of names), or None."""
        nodes = [p for p in self.phases if p not in advancing]
        live = self.live_edges()
        successors = {p: [e.dest for e in live if e.source == p and e.dest not in advancing] for p in nodes}
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        path: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            path.append(node)
            for nxt in successors[node]:
                if state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                if nxt not in state and (found := visit(nxt)):
                    return found
            state[node] = 2
            path.pop()
            return None

        for node in nodes:
            if node not in state and (found := visit(node)):
                return found
        return None

    # ---- walking --------------------------------------------------------------------------------
    def edges_from(self, phase: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.source == phase]

    def next_edge(self, phase: str, trainer: Trainer) -> Edge | None:
        """The edge ``advance`` would take now, without moving (used by plans and tests)."""
        for edge in self.edges_from(phase):
            if edge.condition is None or edge.condition(trainer):
                return edge
        return None

    def build_machine(self, trainer: Trainer, runner: PhaseRunner,
                      on_enter: Callable[[str], None], on_exit: Callable[[str], None]) -> Machine:
        """A flat machine driving ``runner.phase``; enter/exit of every phase call the given hooks."""
        states = [State(name, on_enter=[_bind(on_enter, name)], on_exit=[_bind(on_exit, name)])
                  for name in self.phases]
        transitions = [
            {"trigger": "advance", "source": edge.source, "dest": edge.dest,
             "conditions": [_bind_condition(edge.condition, trainer)] if edge.condition else []}
            for edge in self.edges
        ]
        return Machine(model=runner, states=states, transitions=transitions, initial=self.phases[0],
                       auto_transitions=False, model_attribute="phase", send_event=False)

    # ---- pictures -------------------------------------------------------------------------------
    def edge_label(self, edge: Edge) -> str:
        """The condition's label; an unconditional edge after conditional ones is the 'else' branch."""
        if edge.condition is not None:
            return edge.label
        return "else" if len(self.edges_from(edge.source)) > 1 else ""

    def to_mermaid(self, highlight: str | None = None) -> str:
        """Mermaid ``stateDiagram-v2`` text; ``highlight`` marks the phase a run is in or stopped in."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.phases[0]}"]
        for edge in self.edges:
            label = self.edge_label(edge)
            lines.append(f"    {edge.source} --> {edge.dest}" + (f": {label}" if label else ""))
        lines.append("    done --> [*]")
        if highlight:
            lines += ["    classDef current fill:#ffcc80,stroke:#e65100,stroke-width:3px",
                      f"    class {highlight} current"]
        return "\n".join(lines) + "\n"

    def to_dot(self, highlight: str | None = None) -> str:
        """Graphviz DOT text (needs no Graphviz to produce; ``dot`` turns it into SVG/PNG)."""
        lines = ["digraph phases {", "    rankdir=LR;",
                 '    node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", fontname="Helvetica"];',
                 '    edge [fontname="Helvetica", fontsize=10];',
                 "    __start__ [shape=point, width=0.15];", f"    __start__ -> {self.phases[0]};"]
        for name in self.phases:
            attrs = ['fillcolor="#ffcc80"', "penwidth=3"] if name == highlight else []
            if name == "done":
                attrs.append("peripheries=2")
            if name not in DEFAULT_PHASES:
                attrs.append('fillcolor="#e8f5e9"' if name != highlight else "")
            attrs = [a for a in attrs if a]
            lines.append(f"    {name}" + (f" [{', '.join(attrs)}];" if attrs else ";"))
        for edge in self.edges:
            label = self.edge_label(edge)
            lines.append(f"    {edge.source} -> {edge.dest}" + (f' [label="{label}"];' if label else ";"))
        lines.append("}")
        return "\n".join(lines) + "\n"


class PhaseRunner:
    """The small object the machine drives (never the Trainer or an nn.Module: transitions adds attributes)."""

    phase: str
    advance: Callable[[], bool]


def _bind(hook: Callable[[str], None], name: str) -> Callable[[], None]:
    return lambda: hook(name)


def _bind_condition(condition: Condition, trainer: Trainer) -> Callable[[], bool]:
    return lambda: condition(trainer)
