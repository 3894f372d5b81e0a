"""The phase graph: the registry of phases (name -> handler) and the ordered, conditional edges between them.

It is data only: ``machine.PhaseMachine`` turns it into the ``transitions`` machine that walks it, and
``render`` draws it. Every change is validated on a copy, so a refused change leaves the graph as it was.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from phasetrain.conditions import Condition, checkpoint_due, eval_due, run_finished
from phasetrain.errors import ConfigError, GraphError
from phasetrain.phases import Phase, build_phase, default_phases

if TYPE_CHECKING:
    from phasetrain.config import RunConfig

FIRST, EPOCH, LAST = "setup", "train_epoch", "done"
"""The start, the phase whose every entry starts a new epoch, and the final phase."""
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class Edge:
    """``source -> dest``, taken when ``condition`` holds (None: always). Edges out of a phase are tried in order."""

    source: str
    dest: str
    condition: Condition | None = None


class PhaseGraph:
    """Phases by name, in order, and the edges between them."""

    def __init__(self, phases: list[Phase], edges: list[Edge]) -> None:
        self.phases: dict[str, Phase] = {phase.name: phase for phase in phases}
        self.edges = edges
        self._chains: dict[str, list[str]] = {}  # phase -> [phase, phases added after it, in order]
        self._diverting: set[str] = set()  # phases added with `then`: they leave their chain

    @property
    def names(self) -> list[str]:
        return list(self.phases)

    # ---- changing the graph ---------------------------------------------------------------------
    def add_phase(self, phase: Phase, after: str, when: Condition | None = None, then: str | None = None) -> None:
        """Insert ``phase`` after ``after``: entered when ``when`` (or else the phase's own ``when``) holds,
        then on to what followed ``after`` (or to ``then``, unconditionally). Phases added after the same
        phase are tried in the order they were added, each when its condition holds."""
        self._check_new(phase.name, after, then)
        when = when if when is not None else phase.when
        chain = self._chains.get(after, [after])  # `after` and the phases already added after it
        edges = list(self.edges)
        for member in chain:
            if member in self._diverting:  # it goes on to its own `then`: nothing of the chain follows it
                continue
            # Before member's continuation, after its edges into later members of the chain.
            later = chain[chain.index(member) + 1:]
            out = [i for i, e in enumerate(edges) if e.source == member]
            into_later = [i for i in out if edges[i].dest in later]
            edges.insert(into_later[-1] + 1 if into_later else out[0], Edge(member, phase.name, when))
        edges += self._continuation(phase.name, after, chain, then)
        phases = list(self.phases.values())
        phases.insert(len(phases) - 1 if LAST in self.phases else len(phases), phase)
        PhaseGraph(phases, edges).validate()
        self.phases, self.edges = {p.name: p for p in phases}, edges
        self._chains[after] = [*chain, phase.name]
        if then is not None:
            self._diverting.add(phase.name)

    def _continuation(self, name: str, after: str, chain: list[str], then: str | None) -> list[Edge]:
        """The edges out of a new phase: those out of ``after`` (past the chain), or one into ``then``. Like
        every built-in way into train_epoch, one added by ``then`` goes to done instead once the run is
        finished; without that check it would train past the last epoch."""
        if then is None:
            return [replace(e, source=name) for e in self.edges_from(after) if e.dest not in chain[1:]]
        return ([Edge(name, LAST, run_finished())] if then == EPOCH else []) + [Edge(name, then)]

    def replace_phase(self, phase: Phase) -> Phase:
        """Put ``phase`` in place of the phase of the same name (its edges stay); returns the one replaced."""
        if phase.name not in self.phases:
            raise GraphError(f"replace_phase: no phase named {phase.name!r} to replace; phases: {', '.join(self.phases)}")
        old, self.phases[phase.name] = self.phases[phase.name], phase
        return old

    def _check_new(self, name: str, after: str, then: str | None) -> None:
        if not _NAME.match(name):
            raise GraphError(f"phase name {name!r} must be lowercase letters, digits and '_' "
                             "(it becomes hook names like on_enter_<name>)")
        if name in self.phases:
            raise GraphError(f"a phase named {name!r} already exists; phases: {', '.join(self.phases)} "
                             "(to swap its handler, use replace_phase)")
        for role, existing in (("after", after), ("then", then)):
            if existing is not None and existing not in self.phases:
                raise GraphError(f"{role}={existing!r} names no phase; phases: {', '.join(self.phases)}")
        if after == LAST:
            raise GraphError(f"after={LAST!r}: {LAST} is final, nothing runs after it")
        if then == FIRST:
            raise GraphError(f"then={then!r}: {then} runs once, at the start of the run")

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every phase reachable from setup, done reachable from every phase, every phase has an
        unconditional way out, and no cycle that avoids train_epoch (it could repeat forever). Edges
        after a phase's first unconditional one can never be taken and do not count."""
        names = self.names
        unknown = sorted({p for e in self.edges for p in (e.source, e.dest)} - set(names))
        if unknown:
            raise GraphError(f"edges name unknown phases {unknown}; phases: {', '.join(names)}")
        unreachable = [p for p in names if p not in self._reachable(FIRST, forward=True)]
        if unreachable:
            raise GraphError(f"phases not reachable from {FIRST}: {', '.join(unreachable)}")
        stuck = [p for p in names if p not in self._reachable(LAST, forward=False)]
        if stuck:
            raise GraphError(f"{LAST} cannot be reached from: {', '.join(stuck)}")
        stalls = [p for p in names if p != LAST and all(e.condition for e in self.edges_from(p))]
        if stalls:
            raise GraphError(f"phases with no unconditional way out (the run would stall when no condition "
                             f"holds): {', '.join(stalls)}")
        cycle = self._cycle_avoiding(EPOCH)
        if cycle:
            raise GraphError(f"cycle {' -> '.join(cycle)} never passes {EPOCH}, "
                             "so it could repeat without the epoch or step advancing")

    def edges_from(self, phase: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.source == phase]

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
        seen, todo, live = {start}, [start], self.live_edges()
        while todo:
            node = todo.pop()
            for e in live:
                a, b = (e.source, e.dest) if forward else (e.dest, e.source)
                if a == node and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    def _cycle_avoiding(self, advancing: str) -> list[str] | None:
        """A cycle among the phases other than ``advancing`` (as a list of names), or None."""
        live = self.live_edges()
        successors = {p: [e.dest for e in live if e.source == p and e.dest != advancing]
                      for p in self.phases if p != advancing}
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

        for node in successors:
            if node not in state and (found := visit(node)):
                return found
        return None

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from phasetrain.checkpoint import plain  # torch: only a run that checkpoints needs it
        return {name: plain(phase.state_dict(), f"phase {name!r} state_dict()") for name, phase in self.phases.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, phase_state in state.items():
            if name in self.phases:
                self.phases[name].load_state_dict(phase_state)


def default_graph(eval_every: int = 1, checkpoint_every: int = 1, has_eval_data: bool = True) -> PhaseGraph:
    """``setup -> train_epoch -> eval_epoch -> checkpoint -> done`` with the conditions of this run."""
    finished, evaluate, save = run_finished(), eval_due(eval_every, has_eval_data), checkpoint_due(checkpoint_every)
    return PhaseGraph(default_phases(), [
        Edge(FIRST, LAST, finished),  # a stop requested before the first epoch (from on_run_start, say)
        Edge(FIRST, EPOCH),
        Edge(EPOCH, "eval_epoch", evaluate),
        Edge(EPOCH, "checkpoint", save),
        Edge(EPOCH, LAST, finished),
        Edge(EPOCH, EPOCH),
        Edge("eval_epoch", "checkpoint", save),
        Edge("eval_epoch", LAST, finished),
        Edge("eval_epoch", EPOCH),
        Edge("checkpoint", LAST, finished),
        Edge("checkpoint", EPOCH),
    ])


def build_graph(config: RunConfig, has_eval_data: bool = True) -> PhaseGraph:
    """The graph a run of ``config`` walks: the default one with the config's ``phases`` added or replaced.

    The one place a graph is made from a config (the trainer, ``plan``, ``graph`` and diagrams/ use it);
    it builds the phases, but no model or data.
    """
    graph = default_graph(config.train.eval_every, config.checkpoint.every_epochs, has_eval_data)
    for index, spec in enumerate(config.phases):
        phase, when = build_phase(spec, index)
        if spec.replace:
            if phase.name != spec.replace:
                raise ConfigError(f"phases[{index}]: replace={spec.replace!r}, but {spec.target} built a phase "
                                  f"named {phase.name!r}")
            graph.replace_phase(phase)
        else:
            graph.add_phase(phase, spec.after or "eval_epoch", when, spec.then)
    return graph
