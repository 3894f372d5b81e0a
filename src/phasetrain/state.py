"""Where a run is: its phase, epoch and optimizer step. One small object that callbacks and conditions read."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunState:
    """The counters of a run, all plain numbers so a checkpoint can store them as JSON.

    ``phase`` is the phase the run is in; only the phase machine moves it (see ``phasetrain.machine``).
    ``epoch`` is 1-based: the epoch being trained or just finished (0 before the first).
    ``optimizer_step`` counts optimizer updates over the whole run; ``epoch_start_step`` is its value
    when the current epoch started. ``batch_in_epoch`` counts the micro-batches this process finished in
    the current epoch; ``micro_step`` counts the micro-batches of the current optimizer step begun so
    far (0 between steps: the only moments a checkpoint may be taken).
    ``max_steps`` (``train.max_steps``) ends the run at that optimizer step, mid-epoch if need be: the
    epoch it is reached in is then the last one.
    ``epoch_start_sample`` is 0 but after a resume with another process count in the middle of an epoch:
    the samples of the epoch's order consumed before it, which the processes now re-shard the rest of;
    ``batch_in_epoch`` then counts from there.
    ``resumed`` is True while a resumed run is still in the phase its checkpoint was taken in.
    """

    phase: str = "setup"
    phase_complete: bool = False
    epochs: int = 1
    max_steps: int | None = None
    epoch: int = 0
    optimizer_step: int = 0
    epoch_start_step: int = 0
    batch_in_epoch: int = 0
    micro_step: int = 0
    epoch_start_sample: int = 0
    stop_requested: bool = False
    stop_reason: str = ""
    resumed: bool = field(default=False, compare=False)

    @property
    def is_last_epoch(self) -> bool:
        return self.epoch >= self.epochs or self.reached_max_steps

    @property
    def reached_max_steps(self) -> bool:
        return self.max_steps is not None and self.optimizer_step >= self.max_steps

    @property
    def finished(self) -> bool:
        """True when no more training epochs should run."""
        return self.stop_requested or self.is_last_epoch

    def request_stop(self, reason: str) -> None:
        """Ask the run to go to ``done`` at the next phase boundary (the current phase finishes)."""
        self.stop_requested = True
        self.stop_reason = reason

    def start_epoch(self) -> None:
        """The bookkeeping of a new epoch; the phase machine calls it on every entry into ``train_epoch``."""
        self.epoch += 1
        self.batch_in_epoch = self.micro_step = self.epoch_start_sample = 0
        self.epoch_start_step = self.optimizer_step

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["resumed"]  # a fact about this process, not about the run
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)
