"""``phasetrain plan``: the phases a run will walk, epoch by epoch, without training.

The walk is the real one: the run's own ``PhaseMachine`` is driven with a simulated ``RunState`` whose
optimizer step advances by the epoch's step count each time ``train_epoch`` runs, so evaluations,
checkpoints and custom phases show up exactly when they will happen. Only the data is built (for the
step count); no model, optimizer or Accelerator. Stops requested at run time (early stopping, a phase
calling ``request_stop``) cannot be foreseen and are not assumed.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from phasetrain.config import RunConfig
from phasetrain.errors import GraphError
from phasetrain.graph import EPOCH, LAST, Edge, build_graph
from phasetrain.machine import PhaseMachine
from phasetrain.render import edge_label
from phasetrain.run_folder import RunFolder
from phasetrain.state import RunState


@dataclass
class PlannedEpoch:
    epoch: int
    first_step: int
    last_step: int
    phases: list[tuple[str, str]] = field(default_factory=list)  # (phase, label of the edge into it)


def plan(machine: PhaseMachine, epochs: int, steps_per_epoch: int | None,
         max_steps: int | None = None) -> list[PlannedEpoch]:
    """Walk ``machine`` from setup to done over a simulated run; one entry per epoch (epoch 0 holds setup).
    ``max_steps`` (``train.max_steps``) ends the walk in the epoch it is reached in, as in a real run."""
    state = RunState(epochs=epochs, max_steps=max_steps if steps_per_epoch else None)
    walk = [PlannedEpoch(0, 0, 0)]

    def entered(phase: str, edge: Edge | None) -> None:
        if phase == EPOCH:
            walk.append(PlannedEpoch(state.epoch, state.optimizer_step + 1, _epoch_end(state, steps_per_epoch)))
        walk[-1].phases.append((phase, edge_label(machine.graph, edge) if edge else ""))

    walker = machine.walker(state, entered, lambda phase: None)
    try:
        walker.start()
        for _ in range(100_000):  # a valid graph reaches done; this only guards a broken condition
            if state.phase == LAST:
                return walk
            if state.phase == EPOCH:
                state.optimizer_step = _epoch_end(state, steps_per_epoch)  # what running the epoch does to the counters
            walker.next_phase()
        raise GraphError("plan: the walk did not reach done")
    finally:
        machine.release(walker)


def _epoch_end(state: RunState, steps_per_epoch: int | None) -> int:
    """The optimizer step the current epoch ends at: its last step, or ``max_steps`` if that comes first."""
    end = state.epoch_start_step + (steps_per_epoch or 0)
    return min(end, state.max_steps) if state.max_steps is not None else end


def plan_source(source: pathlib.Path, overrides: list[str]) -> str:
    """The plan of a config file, or of a run folder's ``config.yaml`` (with where that run stopped)."""
    folder = RunFolder(source) if source.is_dir() else None
    config = RunConfig.from_file(folder.config_file if folder else source, overrides=overrides)
    # torch only now: a config with a mistake is answered without it
    from phasetrain.batches import RunData
    from phasetrain.components import build_datasets
    data = RunData(build_datasets(config), config.train, config.seed) if config.data is not None else None
    machine = PhaseMachine(build_graph(config, has_eval_data=data is None or data.eval is not None))
    steps = data.steps_per_epoch if data is not None else None
    text = format_plan(plan(machine, config.train.epochs, steps, config.train.max_steps), str(source),
                       config.train.epochs, steps)
    return text + ("\n" + folder.describe_position() if folder else "")


def format_plan(walk: list[PlannedEpoch], source: str, epochs: int, steps: int | None) -> str:
    lines = [(f"plan for {source}: {epochs} epochs, "
              f"{steps if steps is not None else 'an unknown number of'} optimizer steps per epoch on one process "
              "(stops requested at run time, such as early stopping, are not assumed)")]
    for planned in walk:
        phases = " -> ".join(f"{name} [{label}]" if label and label != "else" else name
                             for name, label in planned.phases)
        if planned.epoch == 0:
            lines.append(f"  start:    {phases}")
        else:
            span = f" (steps {planned.first_step}-{planned.last_step})" if steps else ""
            lines.append(f"  epoch {planned.epoch}{span}: {phases}")
    return "\n".join(lines)
