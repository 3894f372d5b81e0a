"""The phase graph: phases and conditional edges, walked by a flat ``transitions`` machine.

The trainer never decides the phase order itself: after a phase's handler returns, it fires the
machine's single trigger ``advance``; the machine takes the first edge out of the current phase whose
condition holds. Transitions happen per phase, never per batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transitions import Machine, State

from phasetrain.conditions import Condition, checkpoint_due, eval_due, run_finished

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer

# transitions logs 3 INFO lines per transition; that is noise for users and ~30 us each.
logging.getLogger("transitions").setLevel(logging.WARNING)

DEFAULT_PHASES = ("setup", "train_epoch", "eval_epoch", "checkpoint", "done")


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

    def edges_from(self, phase: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.source == phase]

    def next_phase(self, phase: str, trainer: Trainer) -> str | None:
        """The phase ``advance`` would go to now, without moving (used by plans and tests)."""
        for edge in self.edges_from(phase):
            if edge.condition is None or edge.condition(trainer):
                return edge.dest
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


class PhaseRunner:
    """The small object the machine drives (never the Trainer or an nn.Module: transitions adds attributes)."""

    phase: str
    advance: Callable[[], bool]


def _bind(hook: Callable[[str], None], name: str) -> Callable[[], None]:
    return lambda: hook(name)


def _bind_condition(condition: Condition, trainer: Trainer) -> Callable[[], bool]:
    return lambda: condition(trainer)
