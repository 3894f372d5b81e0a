"""``phasetrain plan``: the phases a run will walk, epoch by epoch, without training.

The walk is the real graph's: from ``setup``, each edge's condition is evaluated against a simulated
run state (the epoch and optimizer-step counters a real run would have), so evaluations, checkpoints
and custom phases show up exactly when they will happen. Stops requested at run time (early stopping,
a phase calling ``request_stop``) cannot be foreseen and are not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phasetrain.errors import GraphError
from phasetrain.state import RunState

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer


@dataclass
class PlannedEpoch:
    epoch: int
    first_step: int
    last_step: int
    phases: list[tuple[str, str]] = field(default_factory=list)  # (phase, label of the edge into it)


def plan(trainer: Trainer) -> list[PlannedEpoch]:
    """Simulate the walk from ``setup`` to ``done``; one entry per epoch (epoch 0 holds ``setup``)."""
    real_state = trainer.state
    steps_per_epoch = trainer.steps_per_epoch
    trainer.state = RunState(epochs=real_state.epochs)
    try:
        epochs = [PlannedEpoch(0, 0, 0, [("setup", "")])]
        phase = "setup"
        for _ in range(100_000):  # a valid graph reaches done; this only guards a broken condition
            edge = trainer.graph.next_edge(phase, trainer)
            if edge is None:
                raise GraphError(f"plan: no edge out of {phase!r} can be taken")
            phase = edge.dest
            if phase == "train_epoch":
                state = trainer.state
                state.epoch += 1
                first = state.optimizer_step + 1
                state.epoch_start_step = state.optimizer_step
                state.optimizer_step += steps_per_epoch or 0
                epochs.append(PlannedEpoch(state.epoch, first, state.optimizer_step))
            epochs[-1].phases.append((phase, trainer.graph.edge_label(edge)))
            if phase == "done":
                return epochs
        raise GraphError("plan: the walk did not reach done")
    finally:
        trainer.state = real_state


def format_plan(trainer: Trainer, source: str) -> str:
    epochs = plan(trainer)
    steps = trainer.steps_per_epoch
    lines = [(f"plan for {source}: {trainer.state.epochs} epochs, "
             f"{steps if steps is not None else 'an unknown number of'} optimizer steps per epoch "
             "(stops requested at run time, such as early stopping, are not assumed)")]
    for planned in epochs:
        walk = " -> ".join(f"{name} [{label}]" if label and label != "else" else name for name, label in planned.phases)
        if planned.epoch == 0:
            lines.append(f"  start:    {walk}")
        else:
            span = f" (steps {planned.first_step}-{planned.last_step})" if steps else ""
            lines.append(f"  epoch {planned.epoch}{span}: {walk}")
    return "\n".join(lines)
