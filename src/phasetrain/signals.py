"""Stop signals: SIGTERM/SIGINT set a flag; the run checkpoints at the next optimizer step or phase
boundary and stops with ``RunInterrupted``. With several processes they agree first, so all stop together."""
from __future__ import annotations

import pathlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: optimizer steps between signal agreements in multi-process runs (a collective, so not every step)
AGREE_EVERY = 16

#: Stop signals that arrived before a run installed its handler (see ``catch_early``).
_EARLY: list[int] = []


@contextmanager
def caught_early() -> Iterator[None]:
    """Until a run installs its own handler, remember SIGTERM/SIGINT instead of dying or raising
    KeyboardInterrupt inside an import (which leaves torch half-imported and prints its traceback). The
    run then stops at its first phase boundary with a checkpoint, as for a signal during training. A
    second SIGINT means now. The command line wraps run and resume in it; the handlers are restored after."""
    def remember(signum: int, frame: object) -> None:
        if _EARLY and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _EARLY.append(signum)

    previous = {signum: signal.signal(signum, remember) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _EARLY.clear()


class RunInterrupted(Exception):
    """Raised after a SIGTERM/SIGINT: the current optimizer step finished and a checkpoint was written.
    ``exit_code`` is the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, checkpoint: pathlib.Path, run_dir: pathlib.Path, from_python: bool = False) -> None:
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        how = ("resume it from Python with the same objects: Trainer(config, model=..., ...).run(resume='latest') "
               "(its config.yaml does not name them all, so 'phasetrain resume' cannot rebuild it)" if from_python
               else f"resume with 'phasetrain resume {run_dir}'")
        super().__init__(f"{signal.Signals(signum).name} received: saved {checkpoint}; {how}")


class StopSignals:
    """The SIGTERM/SIGINT flag of this process, and the agreement of all processes on it.

    ``accelerator`` gives ``num_processes``, ``device`` and ``reduce`` (one tiny all-reduce per agreement).
    """

    def __init__(self, accelerator: Any) -> None:
        self._accelerator = accelerator
        self.received: int | None = None

    @property
    def received_signal(self) -> int:
        """The signal received (SIGTERM when another process of the run received it)."""
        return int(self.received or signal.SIGTERM)

    def pending(self, optimizer_step: int | None = None) -> bool:
        """Whether a stop signal arrived in any process. Mid-epoch (``optimizer_step`` given) several
        processes agree only every ``AGREE_EVERY`` steps; at a phase boundary (None) always."""
        accelerator = self._accelerator
        if accelerator.num_processes == 1:
            return self.received is not None
        if optimizer_step is not None and optimizer_step % AGREE_EVERY:
            return False
        import torch  # not at the top: the command line imports this module before torch, to catch_early()

        # Every process must stop at the same step, or the checkpoint's collectives hang.
        flag = torch.tensor(0 if self.received is None else self.received, device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch SIGTERM/SIGINT for the duration of the block (main thread only), then restore the handlers."""
        previous: dict[signal.Signals, Any] = {}
        if _EARLY:  # received while the run was being built
            self.received = _EARLY[0]
            _EARLY.clear()
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: leave signals to the caller
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum
