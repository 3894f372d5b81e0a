"""The run's position: which phase, which epoch, how many optimizer steps. One small object callbacks read."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RunState:
    """Counters of a run, all plain numbers so a checkpoint can store them as JSON.

    ``epoch`` is 1-based: the epoch being trained or just finished (0 before the first).
    ``optimizer_step`` counts optimizer updates; ``batch_in_epoch`` counts micro-batches consumed
    in the current epoch; ``micro_step`` is the position inside the current accumulation group.
    """

    phase: str = "setup"
    epochs: int = 1
    epoch: int = 0
    optimizer_step: int = 0
    batch_in_epoch: int = 0
    micro_step: int = 0
    phase_complete: bool = False
    stop_requested: bool = False
    stop_reason: str = ""
    train_loss_sum: Any = 0.0  # float; a device tensor while an epoch runs (read at checkpoints)
    train_samples: int = 0
    logged_loss_sum: float = 0.0  # train loss sum and samples at the last step log of this epoch
    logged_samples: int = 0
    epoch_start_step: int = 0  # optimizer steps before the current epoch
    monitor_at: tuple[int, int] | None = None  # (epoch, step) when checkpoint.monitor was last logged

    @property
    def is_last_epoch(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def finished(self) -> bool:
        """True when no more training epochs should run."""
        return self.stop_requested or self.epoch >= self.epochs

    def request_stop(self, reason: str) -> None:
        """Ask the run to go to ``done`` at the next phase boundary (the current phase finishes)."""
        self.stop_requested = True
        self.stop_reason = reason

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_loss_sum"] = float(self.train_loss_sum)  # one sync, at a checkpoint only
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        state = cls(**data)
        if state.monitor_at is not None:
            state.monitor_at = (int(state.monitor_at[0]), int(state.monitor_at[1]))  # JSON gives a list
        return state
