"""The run folder: ``config.yaml``, ``metrics.jsonl``, ``model.safetensors``, ``checkpoints/``.

A folder that already holds a run is never silently reused: a finished one is refused, an unfinished
one is left for ``phasetrain resume``, unless the config says ``overwrite: true``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from phasetrain.errors import RunDirError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from phasetrain.config import RunConfig

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
    def checkpoints(self) -> pathlib.Path:
        return self.path / "checkpoints"

    @property
    def finished(self) -> bool:
        """A run that reached ``done`` wrote its final weights; there is nothing to resume."""
        return self.final_weights.exists()

    def holds_run(self) -> bool:
        return any(path.exists() for path in self._run_files())

    def _run_files(self) -> tuple[pathlib.Path, ...]:
        return self.config_file, self.metrics, self.final_weights, self.checkpoints

    def claim(self, config: RunConfig) -> None:
        """Create the folder for a new run and write ``config.yaml``; refuse one that holds a run."""
        if not self.is_main_process:
            return
        if self.holds_run():
            if not (config.overwrite or self.restarting):
                raise RunDirError(self._occupied_message())
            for target in self._run_files():
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, config.to_yaml())

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
        pointer = self.checkpoints / "latest"
        state_file = self.checkpoints / pointer.read_text().strip() / "state.json" if pointer.is_file() else None
        if state_file is None or not state_file.is_file():
            return None, 0, 0
        state = json.loads(state_file.read_text())["state"]
        return str(state["phase"]), int(state["epoch"]), int(state["optimizer_step"])

    def describe_position(self) -> str:
        """Where the run stands, in a line: finished, not started, or its latest checkpoint's position."""
        phase, epoch, step = self.position()
        if phase == "done":
            return f"{self.path}: finished"
        if phase is None:
            return f"{self.path}: no checkpoint yet; 'phasetrain resume {self.path}' starts it from the beginning"
        return (f"{self.path}: latest checkpoint in {phase} of epoch {epoch}, after step {step}; "
                f"'phasetrain resume {self.path}' continues from there")

    def write_final_weights(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Write the unwrapped model's weights as safetensors, atomically, from the main process."""
        accelerator.wait_for_everyone()
        if self.is_main_process:
            from safetensors.torch import save_model
            with atomic_path(self.final_weights) as tmp:
                save_model(accelerator.unwrap_model(model), str(tmp))
        accelerator.wait_for_everyone()


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
