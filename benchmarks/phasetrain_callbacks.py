"""The phasetrain callbacks the benchmarks measure through: given as objects, or named by a config's
``callbacks:`` import specs (``benchmarks.phasetrain_callbacks:FirstStepStamp``)."""
from __future__ import annotations

import os
import pathlib
import signal
import time
from typing import TYPE_CHECKING

import torch

from phasetrain import Callback, Trainer

if TYPE_CHECKING:
    from benchmarks.loops import Record


class EpochStarts(Callback):
    """Tells ``record`` when each train epoch starts; hooks the torch optimizer under accelerate's wrapper."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def on_run_start(self, trainer: Trainer) -> None:
        self.record.count_steps(trainer.optimizer.optimizer)

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self.record.epoch_started()


class FirstStepStamp(Callback):
    """Writes ``time.time()`` to ``path`` after the first optimizer step, then ends the run: the figure is taken."""

    def __init__(self, path: str) -> None:
        self.path = pathlib.Path(path)

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if not self.path.exists():
            self.path.write_text(repr(time.time()))
            trainer.request_stop("benchmark: the first optimizer step is timed")


class FirstStepTimer(Callback):
    """``perf_counter()`` after the first optimizer step of this process; with ``interrupt_at_step``, a SIGTERM
    to this process after that step, as a scheduler preempting the job sends it."""

    def __init__(self, interrupt_at_step: int | None = None) -> None:
        self.interrupt_at_step = interrupt_at_step
        self.first_step: float | None = None

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()
        if trainer.state.optimizer_step == self.interrupt_at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class SaveTimer(Callback):
    """At the end of every train epoch: a checkpoint, timed in two parts (``save_checkpoint()`` returns once the
    state is copied in memory; ``wait_for_checkpoints()`` returns once it is on disk), then a bare
    ``torch.save`` of the same model and optimizer state into ``folder``, for scale."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.blocking: list[float] = []
        self.total: list[float] = []
        self.bare: list[float] = []

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        os.sync()  # each timed save starts with no dirty pages left over from the last
        start = time.perf_counter()
        trainer.save_checkpoint()
        returned = time.perf_counter()
        trainer.wait_for_checkpoints()
        self.blocking.append(returned - start)
        self.total.append(time.perf_counter() - start)
        state = {"model": trainer.accelerator.unwrap_model(trainer.model).state_dict(),
                 "optimizer": trainer.optimizer.optimizer.state_dict()}
        os.sync()
        start = time.perf_counter()
        torch.save(state, self.folder / f"bare-{trainer.state.epoch}.pt")
        self.bare.append(time.perf_counter() - start)
