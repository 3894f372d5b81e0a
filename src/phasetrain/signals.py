"""Stop signals: SIGTERM/SIGINT set a flag; the run checkpoints at the next optimizer step or phase
boundary and stops with ``RunInterrupted``. With several processes they agree first, so all stop together,
and a stop one process requests (``Trainer.request_stop``, an early stop) becomes every process's."""
from __future__ import annotations

import pathlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phasetrain.state import RunState

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


def release_stop_signals() -> int | None:
    """Give SIGTERM and SIGINT back their usual handling, for a process that hands them on (a launcher);
    returns the stop signal ``caught_early`` remembered until now, if one came."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _EARLY[0] if _EARLY else None


class RunInterrupted(Exception):
    """Raised after a SIGTERM/SIGINT: the current optimizer step finished and a checkpoint was written.
    ``exit_code`` is the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, checkpoint: pathlib.Path | None, run_dir: pathlib.Path, from_python: bool = False,
                 processes: int = 1) -> None:
        from phasetrain.launch import resume_command
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        if checkpoint is None:  # train.fast_dev_run: its throwaway folder goes with the run
            super().__init__(f"{signal.Signals(signum).name} received: a train.fast_dev_run keeps nothing to resume")
            return
        how = ("resume it from Python with the same objects: Trainer(config, model=..., ...).run(resume='latest') "
               "(its config.yaml does not name them all, so 'phasetrain resume' cannot rebuild it)" if from_python
               else f"resume with {resume_command(run_dir, processes)}")
        super().__init__(f"{signal.Signals(signum).name} received: saved {checkpoint}; {how}")


class StopSignals:
    """The SIGTERM/SIGINT flag of this process, and the agreement of all processes on stopping.

    ``accelerator`` gives ``num_processes``, ``device`` and ``reduce`` (one tiny all-reduce per agreement).
    After ``agree``, ``signal_pending`` says whether a stop signal reached any process, and ``stop_agreed``
    whether the run stops (``state.stop_requested`` on every process).
    """

    def __init__(self, accelerator: Any) -> None:
        self._accelerator = accelerator
        self.received: int | None = None
        self.signal_pending = self.stop_agreed = False

    @property
    def received_signal(self) -> int:
        """The signal received (SIGTERM when another process of the run received it)."""
        return int(self.received or signal.SIGTERM)

    def agree(self, state: RunState, nonfinite: bool = False) -> bool:
        """Agree with the other processes on stopping, and on whether this optimizer step's loss was finite
        (``nonfinite``: this process's); returns whether it was non-finite on any process.

        With several processes every one must call this at the same point: one tiny all-reduce (and a host
        sync), after which a signal that reached one process is pending on all (they stop at the same step,
        or the checkpoint's collectives would hang), and a stop that one requested in ``state`` is requested
        in every ``state``, with its reason. On one process, no collective.
        """
        accelerator = self._accelerator
        if accelerator.num_processes == 1:
            self.signal_pending, self.stop_agreed = self.received is not None, state.stop_requested
            return nonfinite
        import torch  # not at the top: the command line imports this module before torch, to catch_early()

        flags = torch.tensor([int(nonfinite), int(self.received is not None), int(state.stop_requested)],
                             device=accelerator.device)
        nonfinite_on, received_on, requested_on = accelerator.reduce(flags, reduction="sum").tolist()
        if 0 < requested_on < accelerator.num_processes:  # the same on every process: all gather, or none
            self._share_reason(state)
        self.signal_pending, self.stop_agreed = received_on > 0, requested_on > 0
        return nonfinite_on > 0

    def _share_reason(self, state: RunState) -> None:
        """Every process stops for the first requesting process's reason (a rare gather: once per run)."""
        from accelerate.utils import gather_object
        reasons = gather_object([state.stop_reason if state.stop_requested else None])
        rank, reason = next((rank, reason) for rank, reason in enumerate(reasons) if reason is not None)
        if not state.stop_requested:
            state.request_stop(f"{reason} (on process {rank})")

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
            raise KeyboardInterrupt  # a second Ctrl-C means now (a launcher passes on the first one only once)
        self.received = signum
