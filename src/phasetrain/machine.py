"""The one walker: a flat ``transitions`` machine, built from the phase graph, decides every next phase.

The trainer runs the current phase's handler and then calls ``walker.next_phase()``: the machine takes
the first edge out of the phase whose condition holds for the walker's run state. ``phasetrain plan``
walks the very same machine with a simulated run state. Entering ``train_epoch`` starts an epoch
(``RunState.start_epoch``) here and nowhere else. Transitions happen per phase, never per batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transitions import Machine, State

from phasetrain.errors import GraphError
from phasetrain.graph import EPOCH, FIRST, LAST, Edge, PhaseGraph
from phasetrain.state import RunState

EnterHook = Callable[[str, Edge | None], None]  # (phase, the edge taken into it; None when no edge was)
ExitHook = Callable[[str], None]


class Walker:
    """The model object the machine drives: its ``phase`` is its run state's ``phase``.

    Never the Trainer or an ``nn.Module``: transitions adds attributes to the object it drives
    (``advance``, ``may_advance``, ``is_phase_<name>``, ``trigger``).
    """

    advance: Callable[[], bool]  # added by transitions: take the first edge whose condition holds

    def __init__(self, state: RunState, on_enter: EnterHook, on_exit: ExitHook) -> None:
        self.state = state
        self._on_enter, self._on_exit = on_enter, on_exit

    @property
    def phase(self) -> str:
        return self.state.phase

    @phase.setter
    def phase(self, name: str) -> None:
        self.state.phase = name

    def next_phase(self) -> None:
        """Leave the current phase by the first edge whose condition holds.

        The phase's exit hooks fire first, before any condition is asked: a stop they request (an early
        stop on a record logged from ``on_exit_eval_epoch``) decides this very move, not the next one."""
        self.exited(self.state.phase)
        with _quiet_transitions():
            moved = self.advance()
        if not moved:
            raise GraphError(f"no edge out of phase {self.state.phase!r} could be taken")

    def start(self) -> None:
        """Enter the phase the state is in, where the walk starts: a fresh run's setup, or the phase a
        resume re-enters. The machine fires no enter for it, and no epoch starts again."""
        self._on_enter(self.state.phase, None)

    def entered(self, phase: str, edge: Edge | None) -> None:
        state = self.state
        state.phase_complete = False
        if phase == EPOCH:
            if state.finished:
                raise GraphError(f"the walk entered {EPOCH} from {edge.source if edge else '?'} after the last epoch "
                                 f"(epoch {state.epoch} of {state.epochs}{', stop requested' if state.stop_requested else ''}): "
                                 f"an edge into {EPOCH} must come after a 'finished' edge to {LAST}")
            state.start_epoch()
        self._on_enter(phase, edge)

    def exited(self, phase: str) -> None:
        self.state.resumed = False
        self._on_exit(phase)


class PhaseMachine:
    """A ``transitions.Machine`` over the phases of ``graph``, with one trigger, ``advance``."""

    def __init__(self, graph: PhaseGraph) -> None:
        self.graph = graph
        # No on_exit: the walker fires exit hooks itself, before the conditions (Walker.next_phase).
        states = [State(name, on_enter=[_entering(name, self._edge_of)]) for name in graph.names]
        transitions = [{"trigger": "advance", "source": edge.source, "dest": edge.dest,
                        "conditions": [_holds(edge.condition)] if edge.condition else []}
                       for edge in graph.edges]
        self._machine = Machine(model=None, states=states, transitions=transitions, initial=FIRST,
                                auto_transitions=False, model_attribute="phase", send_event=True)
        # The Edge each of the machine's transitions was made from, so enter hooks know which was taken.
        event = self._machine.events["advance"]
        self._edges = {id(transition): edge for name in graph.names
                       for transition, edge in zip(event.transitions.get(name, []), graph.edges_from(name), strict=True)}

    def walker(self, state: RunState, on_enter: EnterHook, on_exit: ExitHook) -> Walker:
        """A walker that starts in ``state.phase`` (no hook fires for it); ``release`` it when done."""
        if state.phase not in self.graph.phases:
            raise GraphError(f"phase {state.phase!r} is not in this run's graph; phases: "
                             f"{', '.join(self.graph.names)} (add the same custom phases before resuming)")
        walker = Walker(state, on_enter, on_exit)
        self._machine.add_model(walker, initial=state.phase)
        return walker

    def release(self, walker: Walker) -> None:
        self._machine.remove_model(walker)

    def transitions(self) -> list[tuple[str, str]]:
        """(source, dest) of every transition of the live machine, in order."""
        event = self._machine.events["advance"]
        return [(t.source, str(t.dest)) for name in self.graph.names for t in event.transitions.get(name, [])]

    def _edge_of(self, event: Any) -> Edge | None:
        return self._edges.get(id(event.transition))


def _entering(name: str, edge_of: Callable[[Any], Edge | None]) -> Callable[[Any], None]:
    return lambda event: event.model.entered(name, edge_of(event))


def _holds(condition: Any) -> Callable[[Any], bool]:
    return lambda event: condition(event.model.state)


@contextmanager
def _quiet_transitions() -> Iterator[None]:
    """transitions logs 3 INFO lines per transition (noise, ~30 us each): silence them for our own
    transitions only, and only when nobody set the transitions logger's level explicitly."""
    logger = logging.getLogger("transitions")
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)
