"""Phases: the nodes of the graph. Each built-in one is a thin node that calls a ``Trainer`` method.

The work itself lives in the trainer's overridable methods (``train_epoch()``, ``eval_epoch()``,
``evaluate()``, ...); a phase decides nothing about what runs next (the machine does, see ``machine.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phasetrain.conditions import Condition, condition_from_config, every_n_epochs
from phasetrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from phasetrain.config import PhaseSpec
    from phasetrain.trainer import Trainer


class Phase:
    """A node of the phase graph: a name and a handler that receives the trainer.

    Subclass it, set ``name`` and implement ``run``; add it with ``trainer.add_phase(phase, after=...)``,
    or put it in place of a phase of the same name with ``trainer.replace_phase(phase)``. ``when`` is the
    condition used when ``add_phase`` is given none (None: every time). ``check`` runs when the phase is
    added, to refuse a phase that cannot work with this trainer before training. ``records`` is the
    prefix of the metrics it logs (``"test"`` for ``test/loss``), if it logs any.

    Example::

        class Unfreeze(Phase):
            name = "unfreeze"
            when = on_epoch(3)  # phasetrain.conditions.on_epoch
            def run(self, trainer):
                for p in trainer.model.parameters():
                    p.requires_grad_(True)
    """

    name: str = ""
    when: Condition | None = None
    records: str | None = None

    def run(self, trainer: Trainer) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define run(self, trainer)")

    def check(self, trainer: Trainer) -> None:
        """Raise a PhasetrainError if this phase cannot run with ``trainer``."""

    def state_dict(self) -> dict[str, Any]:
        """State a checkpoint must keep for an exact resume (counters, anything the phase changed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SetupPhase(Phase):
    """Runs two train samples through the model and loss, then claims the run folder (``Trainer.setup_run``)."""

    name = "setup"

    def run(self, trainer: Trainer) -> None:
        trainer.setup_run()


class TrainEpochPhase(Phase):
    """One epoch of optimizer steps (``Trainer.train_epoch``). Every entry into this node starts an epoch."""

    name = "train_epoch"
    records = "train"

    def run(self, trainer: Trainer) -> None:
        trainer.train_epoch()


class EvalEpochPhase(Phase):
    """Loss and metrics over the eval set, logged as ``eval/...`` (``Trainer.eval_epoch``)."""

    name = "eval_epoch"
    records = "eval"

    def run(self, trainer: Trainer) -> None:
        trainer.eval_epoch()


class CheckpointPhase(Phase):
    """Saves a checkpoint of the whole run at an epoch boundary."""

    name = "checkpoint"

    def run(self, trainer: Trainer) -> None:
        # Saving is this phase's whole work: a resume goes on to the next phase, not through it again.
        trainer.save_checkpoint(phase_finished=True)


class DonePhase(Phase):
    """Evaluates the test split if there is one, then writes the final weights (``Trainer.finish_run``)."""

    name = "done"
    records = "test"

    def run(self, trainer: Trainer) -> None:
        trainer.finish_run()


class TestPhase(Phase):
    """A mid-run evaluation of a held-out set, logged as ``<name>/loss``, ``<name>/accuracy``, ...

    ``dataset`` defaults to the data's ``test`` split; ``every`` sets the default condition
    (``every_n_epochs(every)``). In a config::

        phases:
          - {target: "phasetrain:TestPhase", args: {every: 2}, after: eval_epoch}
    """

    __test__ = False  # not a pytest test class

    def __init__(self, dataset: Any = None, every: int = 1, name: str = "test") -> None:
        self.dataset = dataset
        self.name = self.records = name
        self.when = every_n_epochs(every)

    def check(self, trainer: Trainer) -> None:
        if self._dataset(trainer) is None:
            raise DataError(f"TestPhase {self.name!r} has no dataset: pass TestPhase(dataset) or return a "
                            "'test' split from the config's data")

    def _dataset(self, trainer: Trainer) -> Any:
        return self.dataset if self.dataset is not None else trainer.data.test

    def run(self, trainer: Trainer) -> None:
        trainer.log(prefixed(self.name, trainer.evaluate(self._dataset(trainer))))


def default_phases() -> list[Phase]:
    return [SetupPhase(), TrainEpochPhase(), EvalEpochPhase(), CheckpointPhase(), DonePhase()]


def prefixed(prefix: str, results: dict[str, float]) -> dict[str, float]:
    """``{"loss": 0.3}`` -> ``{"eval/loss": 0.3}``: the record keys of a phase's results."""
    return {f"{prefix}/{name}": value for name, value in results.items()}


def build_phase(spec: PhaseSpec, index: int) -> tuple[Phase, Condition | None]:
    """A config ``phases[index]`` entry's phase and its ``when`` condition (None: the phase's own)."""
    phase = spec.build(what=f"phases[{index}]")
    if not isinstance(phase, Phase):
        raise ConfigError(f"phases[{index}]: {spec.target} built a {type(phase).__name__}, expected a phasetrain.Phase")
    when = condition_from_config(spec.when, f"phases[{index}].when") if spec.when is not None else None
    return phase, when
