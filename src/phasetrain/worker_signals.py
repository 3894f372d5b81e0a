"""Stop signals in DataLoader workers: left to the main process, which checkpoints before it stops."""
from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A SIGTERM or SIGINT sent to the whole process group (docker, Kubernetes, systemd, Slurm; Ctrl-C) reaches
# the workers too. The main process only sets a flag and checkpoints at its next optimizer step, which
# needs more batches: a dead worker would fail that fetch and lose the step. So workers leave both signals
# to the main process.
#
# Why not simply SIG_IGN for SIGTERM (read in torch 2.13: utils/data/dataloader.py _shutdown_workers,
# _utils/worker.py _worker_loop, csrc/DataLoader.cpp): a worker normally ends on the None that
# _shutdown_workers puts in its index queue, or through ManagerWatchdog once its main process is gone; no
# signal is involved, so ignoring SIGTERM cannot hang that path. But SIGTERM from the main process is the
# fallback twice: _shutdown_workers terminate()s a worker still alive after join(timeout) (joined with a
# timeout again: no hang, the worker would just linger), and at interpreter exit with an iterator still
# alive (a traceback or a global holding it) _shutdown_workers does nothing while multiprocessing's
# _exit_function terminate()s every daemonic child and join()s it with NO timeout: a worker ignoring
# SIGTERM hangs that exit forever (seen: such a script never ended; test_data_faults has the case).
# torch's own worker handler exits when the sender is the parent and dies otherwise. Here SIGTERM stays
# blocked in every thread of a worker and one thread takes each with sigwaitinfo: the main process's ends
# the worker as torch's handler would, any other is dropped. The main process never sends SIGINT: SIG_IGN.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_CAN_FILTER = hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")  # Linux, not macOS/Windows


def worker_init(num_workers: int) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` for a DataLoader with ``num_workers`` (None without workers)."""
    return functools.partial(leave_stop_signals_to_main, os.getpid()) if num_workers > 0 and _CAN_FILTER else None


def leave_stop_signals_to_main(main_pid: int, worker_id: int) -> None:
    """In a worker, before its first item: ignore SIGINT, and end on SIGTERM only when ``main_pid`` sends it.
    ``main_pid`` rather than getppid(): under the forkserver start method the parent is the fork server."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also drops one that arrived while blocked at the fork
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_end_on_sigterm_from, args=(main_pid,), name="phasetrain-sigterm", daemon=True).start()


def _end_on_sigterm_from(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass  # sent to the whole group: the main process decides when this worker ends
    os._exit(0)  # what torch's handler does for its parent: a clean exit, so no "worker killed" error follows


@contextmanager
def stop_signals_blocked(starting_workers: bool) -> Iterator[None]:
    """Block SIGTERM/SIGINT in this thread while it starts DataLoader workers: a forked worker inherits the
    mask, so a signal arriving before its ``worker_init_fn`` waits for it instead of killing the worker.
    One meant for this process is delivered when the block ends (or meanwhile to another thread)."""
    if not (starting_workers and _CAN_FILTER):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
