"""The run folder: ``config.yaml``, ``metrics.jsonl``, ``model.safetensors``, ``checkpoints/``, and where
they are wanted ``best.safetensors`` (the best checkpoint's weights) and ``ema.safetensors`` (the EMA callback's).

A folder that already holds a run is never silently reused: a finished one is refused, an unfinished
one is left for ``phasetrain resume``, unless the config says ``overwrite: true``.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from phasetrain.errors import RunDirError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from phasetrain.config import RunConfig

#: Run folders whose lock this process holds (resolved paths).
_HELD: set[pathlib.Path] = set()


class RunFolder:
    """The paths of one run, the one place they are spelled, and the few writes that touch them outside
    checkpoints. ``is_main_process``: only the main process writes."""

    def __init__(self, path: pathlib.Path, is_main_process: bool = True) -> None:
        self.path = path
        self.is_main_process = is_main_process
        self.restarting = False  # resume found no checkpoint: this run may reuse its own unfinished folder

    @property
    def config_file(self) -> pathlib.Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    @property
    def final_weights(self) -> pathlib.Path:
        return self.path / "model.safetensors"

    @property
    def best_weights(self) -> pathlib.Path:
        """The weights of the best checkpoint by ``checkpoint.monitor`` (written when ``keep_best >= 1``)."""
        return self.path / "best.safetensors"

    @property
    def ema_weights(self) -> pathlib.Path:
        """The exponential moving average of the weights, written at the end by ``phasetrain.ema.EMA``."""
        return self.path / "ema.safetensors"

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.path / "checkpoints"

    @property
    def tracking(self) -> pathlib.Path:
        """What trackers that write files (TensorBoard) write; see ``phasetrain.tracking``."""
        return self.path / "tracking"

    @property
    def graph_file(self) -> pathlib.Path:
        return self.path / "graph.json"

    @property
    def finished(self) -> bool:
        """A run that reached ``done`` wrote its final weights; there is nothing to resume."""
        return self.final_weights.exists()

    def holds_run(self) -> bool:
        return any(path.exists() for path in self._run_files())

    def _run_files(self) -> tuple[pathlib.Path, ...]:
        return (self.config_file, self.metrics, self.final_weights, self.checkpoints, self.graph_file,
                self.best_weights, self.ema_weights, self.tracking)

    def claim(self, config: RunConfig, graph: str) -> None:
        """Create the folder for a new run and write its recipe; refuse one that holds a run."""
        if not self.is_main_process:
            return
        self.refuse_if_occupied(config)
        if self.holds_run():  # overwrite, or a resume that found no checkpoint and starts over
            for target in self._run_files():
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_recipe(config, graph)

    def write_recipe(self, config: RunConfig, graph: str) -> None:
        """``config.yaml`` and ``graph.json`` (a JSON description of the phase graph): what the folder alone
        needs to repeat the run and to draw it. Main process only."""
        if self.is_main_process:
            atomic_write_text(self.config_file, config.to_yaml())
            atomic_write_text(self.graph_file, graph)

    def refuse_if_occupied(self, config: RunConfig) -> None:
        """Refuse a folder that cannot take a new run: a file, or one holding a run (unless overwriting).
        Cheap, so the command line calls it before building anything. The main process decides: it owns
        the folder, and another process of the same run would otherwise see the folder the main one has
        just claimed (a race that failed a two-process test about one launch in five)."""
        self._refuse_a_file()
        if self.is_main_process and self.holds_run() and not (config.overwrite or self.restarting):
            raise RunDirError(self._occupied_message())

    def _refuse_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run_dir {str(self.path)!r} is a file, not a folder; choose another run_dir")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder for the life of a run or resume (main process only).

        An OS lock (a POSIX record lock) on ``RUN_DIR/.lock``, so the kernel releases it when the process
        dies: a ``kill -9`` never leaves a stale lock. A second process gets a RunDirError naming the holder.
        Re-entrant within a process (the command line takes it before building the trainer, the
        trainer again in ``run()``). Leftover temporary files of killed runs are removed under it.
        """
        key = self.path.resolve()
        if not self.is_main_process or key in _HELD:
            yield
            return
        created = not self.path.exists()
        fd = self._acquire()
        _HELD.add(key)
        try:
            self.remove_leftovers()
            yield
        finally:
            _HELD.discard(key)
            if created and [p.name for p in self.path.iterdir()] == [".lock"]:
                # Nothing was written (a check failed): leave no folder behind. Unlinked while still held,
                # so a process that opened this file meanwhile sees it is gone and starts over (_acquire).
                (self.path / ".lock").unlink()
                with suppress(OSError):  # another process has just created its own lock file in it
                    self.path.rmdir()
            os.close(fd)  # closing the descriptor releases the lock

    def _acquire(self) -> int:
        fd = self._open_lock()
        try:
            # A POSIX record lock, not flock(): it belongs to this process alone, so DataLoader workers forked
            # from it (which inherit the descriptor) do not keep it held after a kill -9 of this process.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            message = self._busy_message(fd)
            os.close(fd)
            raise RunDirError(message) from None
        if not _same_file(fd, self.path / ".lock"):  # its last holder removed it while we opened it
            os.close(fd)
            return self._acquire()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)}\n".encode())
        return fd

    def _open_lock(self) -> int:
        self._refuse_a_file()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunDirError(f"run folder {str(self.path)!r} is not writable ({exc.strerror}); "
                              "choose a run_dir you can write to, or fix its permissions") from None

    def _busy_message(self, fd: int) -> str:
        holder = ""
        for _ in range(20):  # the holder writes its pid right after taking the lock
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if holder:
                break
            time.sleep(0.05)
        holder = holder or "unknown"
        pid, _, command = holder.partition(" ")
        return (f"run folder {str(self.path)!r} is in use by process {pid}"
                f"{f' ({command})' if command else ''}; wait for it to finish or stop it, then try again")

    def remove_leftovers(self) -> None:
        """Delete the temporary files and folders that kills leave behind (``.config.yaml.*.tmp``,
        ``checkpoints/.tmp-*``, ``checkpoints/.latest.*.tmp``). Only under the lock: another live
        process could be writing them otherwise. ``.old-*`` checkpoints are intact copies and stay."""
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                for leftover in [*folder.glob(".*.tmp"), *folder.glob(".tmp-*")]:
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def _occupied_message(self) -> str:
        if self.finished:
            return (f"run_dir {str(self.path)!r} already holds a finished run ({self.final_weights.name}); "
                    f"choose another run_dir (e.g. run_dir={self.path}-2) or set overwrite=true to replace it")
        return (f"run_dir {str(self.path)!r} already holds an unfinished run; continue it with "
                f"'phasetrain resume {self.path}', choose another run_dir, or set overwrite=true to replace it")

    def position(self) -> tuple[str | None, int, int]:
        """(phase, epoch, optimizer step) the run is in: done when finished, else its latest checkpoint's
        (None when it has none)."""
        if self.finished:
            return "done", 0, 0
        latest = read_latest(self.checkpoints)
        # A damaged state.json: where the run stands is unknown, which is no reason to fail drawing it.
        saved = read_summary(latest) if latest else None
        return (saved.phase, saved.epoch, saved.step) if saved else (None, 0, 0)

    def describe_position(self) -> str:
        """Where the run stands, in a line: finished, not started, or its latest checkpoint's position."""
        phase, epoch, step = self.position()
        if phase == "done":
            return f"{self.path}: finished"
        if phase is None and any(self.checkpoints.glob("epoch*")):
            return (f"{self.path}: its latest checkpoint cannot be read; 'phasetrain resume {self.path}' continues "
                    "from the newest intact one")
        if phase is None:
            return f"{self.path}: no checkpoint yet; 'phasetrain resume {self.path}' starts it from the beginning"
        return (f"{self.path}: latest checkpoint in {phase} of epoch {epoch}, after step {step}; "
                f"'phasetrain resume {self.path}' continues from there")

    def write_final_weights(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Write the unwrapped model's weights to ``model.safetensors`` (see ``write_weights``)."""
        self.write_weights(accelerator, model, self.final_weights)

    def write_weights(self, accelerator: Accelerator, model: torch.nn.Module, path: pathlib.Path) -> None:
        """Write the unwrapped model's weights to ``path`` as safetensors, atomically, from the main process.
        Every process calls it: it waits for all of them before and after the write."""
        accelerator.wait_for_everyone()
        if self.is_main_process:
            from safetensors.torch import save_model

            from phasetrain.accelerator import bare_model
            with atomic_path(path) as tmp:
                save_model(bare_model(accelerator, model), str(tmp))
        accelerator.wait_for_everyone()


@dataclass(frozen=True)
class CheckpointSummary:
    """Where a checkpoint was taken, and the monitored value it ranks by (None: not measured on its weights)."""

    phase: str
    epoch: int
    step: int
    monitor: float | None


def read_summary(checkpoint: pathlib.Path) -> CheckpointSummary | None:
    """The summary in ``checkpoint``'s state.json; None when it cannot be read."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text())
        state, value = saved["state"], saved.get("monitor")
        return CheckpointSummary(str(state["phase"]), int(state["epoch"]), int(state["optimizer_step"]),
                                 float(value) if isinstance(value, int | float) else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_first(monitored: Iterable[tuple[float, str]], mode: str) -> list[str]:
    """Checkpoint names ranked by their monitored value (``(value, name)`` pairs), the best first: the
    lowest for ``mode`` "min", the highest for "max"; a tie goes by name."""
    return [name for _, name in sorted(monitored, reverse=mode == "max")]


def read_latest(checkpoints: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint folder ``checkpoints/latest`` names, or None when it names none that could be one.

    The pointer holds a folder name and nothing else: garbage, a path (``../other-run/...``) or a name
    outside this folder counts as naming nothing, so a resume falls back to the newest intact checkpoint
    and never follows it into another run.
    """
    pointer = checkpoints / "latest"
    if pointer.exists() and not pointer.is_file():
        raise RunDirError(f"{pointer} is a {'folder' if pointer.is_dir() else 'special file'}, not the one-line "
                          "file phasetrain keeps there; move it out of the checkpoints folder")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or name in (".", "..", "latest") or "/" in name or "\0" in name:
        return None
    return checkpoints / name


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Readers see the old file or the new one, never a half-written one, whatever happens meanwhile.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        follow_umask(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: pathlib.Path) -> None:
    """fsync a file or folder so a rename that follows cannot land before its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def follow_umask(path: pathlib.Path) -> None:
    """Give ``path`` the mode any new file gets: mkstemp and safetensors create files 0600."""
    os.chmod(path, 0o666 & ~_umask())


@functools.cache
def _umask() -> int:
    # The umask can only be read by setting it: set it straight back, once per process.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
