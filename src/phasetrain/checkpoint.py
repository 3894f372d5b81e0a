"""Checkpoints: atomic folders with a checksummed manifest, retention, and exact resume.

A checkpoint folder ``RUN_DIR/checkpoints/epoch003-step0000168-checkpoint/`` holds:

- ``model.safetensors``            the unwrapped model's weights
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``   state dicts (tensors and plain data only)
- ``rng-<rank>.pt``                python, numpy, torch CPU/CUDA RNG states of each process
- ``callbacks.pt``                 every callback's and every phase's ``state_dict()``
- ``state.json``                   phase and counters, data order, run history, config, version
- ``manifest.json``                CRC-32 and size of every file above, written last

It is written into ``checkpoints/.tmp-<name>``, fsynced, then renamed into place; ``checkpoints/latest``
(a one-line file naming the newest checkpoint) is replaced last. A crash at any moment leaves the
previous checkpoint and pointer intact. ``.pt`` files are read with ``torch.load(weights_only=True)``,
so a checkpoint cannot execute code when loaded.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phasetrain.errors import CheckpointError
from phasetrain.rng import capture_rng, restore_rng
from phasetrain.run_folder import atomic_write_text, fsync_path
from phasetrain.state import RunState

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer

FORMAT_VERSION = 1
SIGNAL_CHECK_EVERY = 16  # optimizer steps between signal agreements in multi-process runs


class RunInterrupted(Exception):
    """Raised after a SIGTERM/SIGINT: the current optimizer step finished and a checkpoint was written."""

    def __init__(self, signal_name: str, checkpoint: pathlib.Path, run_dir: pathlib.Path) -> None:
        self.checkpoint = checkpoint
        super().__init__(f"{signal_name} received: saved {checkpoint}; resume with 'phasetrain resume {run_dir}'")


class CheckpointManager:
    """Saves, finds, verifies and loads the checkpoints of one trainer's run."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._world_size = trainer.accelerator.num_processes
        self.signal_received: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def folder(self) -> pathlib.Path:
        return self.trainer.run_folder.checkpoints

    # ---- when ---------------------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Mid-epoch checkpoint every ``checkpoint.every_steps`` steps; checkpoint and stop after a signal."""
        every = self.trainer.config.checkpoint.every_steps
        step = self.trainer.state.optimizer_step
        # Alone, the flag is a plain read. With several processes they must agree, which is a collective:
        # do it every SIGNAL_CHECK_EVERY steps rather than every step.
        if (self._world_size == 1 or step % SIGNAL_CHECK_EVERY == 0) and self.signal_pending():
            self.stop_for_signal()
        if every and step % every == 0:
            self.save()

    def signal_pending(self) -> bool:
        """Whether a stop signal arrived (in any process; the processes agree, one all-reduce)."""
        return self._signal_agreed()

    def _signal_agreed(self) -> bool:
        # With several processes every one must stop at the same step, or the checkpoint's
        # collectives hang: agree on the flag (one tiny all-reduce; DDP already syncs every step).
        accelerator = self.trainer.accelerator
        if self._world_size == 1:
            return self.signal_received is not None
        flag = torch.tensor(0 if self.signal_received is None else self.signal_received, device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def stop_for_signal(self) -> None:
        signum = self.signal_received or signal.SIGTERM
        path = self.save()
        raise RunInterrupted(signal.Signals(signum).name, path, self.trainer.run_dir)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT set a flag; the train loop finishes its optimizer step, checkpoints and stops."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to the caller
                return

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal_received = signum

    # ---- save ---------------------------------------------------------------------------------
    def save(self) -> pathlib.Path:
        """Write a checkpoint of the run's current position; returns its folder."""
        trainer = self.trainer
        accelerator = trainer.accelerator
        state = trainer.state
        if state.micro_step:
            raise CheckpointError(
                f"cannot checkpoint inside a gradient-accumulation group (micro-step {state.micro_step} of "
                f"{trainer.config.train.grad_accum_steps}): accumulated gradients are not saved, so the resume "
                "would not be exact; save at an optimizer-step boundary (on_train_step_end)")
        name = f"epoch{state.epoch:03d}-step{state.optimizer_step:07d}-{state.phase}"
        final = self.folder / name
        tmp = self.folder / f".tmp-{name}"
        if accelerator.is_main_process:
            for stale in self.folder.glob(".tmp-*"):  # left by a crash inside an earlier write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Per process: its RNG streams and its share of the epoch's running loss.
        torch.save({**_rng_to_tensors(capture_rng()), "train_loss_sum": float(state.train_loss_sum)},
                   tmp / f"rng-{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Each file is hashed and fsynced on a worker thread as soon as it is closed, while the
            # next one is serialized (hashlib and file I/O release the GIL): the checksums and the
            # durability cost little more than the writes themselves.
            with ThreadPoolExecutor(max_workers=2) as finisher:
                digests: dict[str, Future[dict[str, Any]]] = {}
                for path in self._write_main_files(tmp):
                    digests[path.name] = finisher.submit(_digest_and_sync, path)
                for path in tmp.glob("rng-*.pt"):
                    digests[path.name] = finisher.submit(_digest_and_sync, path)
                _write_manifest(tmp, {name: future.result() for name, future in sorted(digests.items())})
            # The same position saved again: move the old one aside first and delete it only once the
            # new one is in place, so some intact copy exists at every moment.
            old = self.folder / f".old-{name}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            fsync_path(self.folder)
            shutil.rmtree(old, ignore_errors=True)
            atomic_write_text(self.folder / "latest", name + "\n")
            self._apply_retention(name)
        accelerator.wait_for_everyone()
        return final

    def _write_main_files(self, tmp: pathlib.Path) -> Iterator[pathlib.Path]:
        """Write the main process's files, yielding each path once it is closed (largest first)."""
        from safetensors.torch import save_model
        trainer = self.trainer
        torch.save(trainer.optimizer.optimizer.state_dict(), tmp / "optimizer.pt")
        yield tmp / "optimizer.pt"
        save_model(trainer.accelerator.unwrap_model(trainer.model), str(tmp / "model.safetensors"))
        yield tmp / "model.safetensors"
        if trainer.scheduler is not None:
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            yield tmp / "scheduler.pt"
        if trainer.accelerator.scaler is not None:
            torch.save(trainer.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            yield tmp / "scaler.pt"
        torch.save({"callbacks": [cb.state_dict() for cb in trainer.callbacks],
                    "phases": {name: phase.state_dict() for name, phase in trainer.phases.items()}},
                   tmp / "callbacks.pt")
        yield tmp / "callbacks.pt"
        monitor = trainer.config.checkpoint.monitor
        metadata = {
            "format_version": FORMAT_VERSION,
            "phasetrain_version": _version(),
            "state": trainer.state.to_dict(),
            "data_order": {"seed": trainer.config.seed, "shuffle": trainer.config.train.shuffle},
            "processes": trainer.accelerator.num_processes,
            "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
            "history": trainer.run_history.state_dict(),
            # Frozen/unfrozen parameters are model state that state_dict() leaves out.
            "requires_grad": {name: p.requires_grad for name, p in
                              trainer.accelerator.unwrap_model(trainer.model).named_parameters()},
            # keep_best ranks only checkpoints taken right after the metric was measured.
            "monitor": {"name": monitor, "value": _latest(trainer, monitor) if trainer.monitor_is_fresh() else None},
            "config": trainer.config.to_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(metadata, indent=1))
        yield tmp / "state.json"

    def _apply_retention(self, newest: str) -> None:
        cfg = self.trainer.config.checkpoint
        intact = [c for c in self.all() if c.name != newest]
        keep = {newest}
        keep.update(c.name for c in intact[-max(cfg.keep_last - 1, 0):] if cfg.keep_last > 1)
        ranked = [(v, c.name) for c in [*intact, self.folder / newest] if (v := _monitor_value(c)) is not None]
        ranked.sort(reverse=cfg.mode == "max")
        keep.update(name for _, name in ranked[: cfg.keep_best])
        for checkpoint in intact:
            if checkpoint.name not in keep:
                shutil.rmtree(checkpoint, ignore_errors=True)

    # ---- find and verify ------------------------------------------------------------------------
    def all(self) -> list[pathlib.Path]:
        """Checkpoint folders, oldest first (by optimizer step, then epoch, then creation)."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        # A crash between moving an old copy aside and renaming its replacement in leaves only the
        # .old- copy: it is intact, so it counts.
        found += [p for p in self.folder.glob(".old-*") if not (self.folder / p.name[5:]).exists()]
        return sorted(found, key=lambda p: (_step_of(p), p.stat().st_mtime_ns))

    def find(self, which: str | os.PathLike[str]) -> pathlib.Path:
        """``"latest"`` (falling back to the newest intact one, with a warning) or a checkpoint path."""
        if str(which) != "latest":
            path = pathlib.Path(which)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected a checkpoint folder)")
            verify(path)
            return path
        pointer = self.folder / "latest"
        named = self.folder / pointer.read_text().strip() if pointer.is_file() else None
        candidates = ([named] if named else []) + [c for c in reversed(self.all()) if c != named]
        for candidate in candidates:
            try:
                verify(candidate)
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint: {exc}", stacklevel=3)
                continue
            if candidate != named:
                warnings.warn(f"resuming from {candidate.name}, the newest intact checkpoint "
                              f"(latest pointed to {named.name if named else 'nothing'})", stacklevel=3)
            return candidate
        raise CheckpointError(f"no intact checkpoint in {self.folder} to resume from")

    # ---- load ---------------------------------------------------------------------------------
    def load(self, path: pathlib.Path) -> None:
        """Restore model, optimizer, scheduler, scaler, RNG, counters, history, callbacks and the phase."""
        trainer = self.trainer
        metadata = json.loads((path / "state.json").read_text())
        changed = _changed_keys(metadata["config"], trainer.config.to_dict())
        if changed:
            warnings.warn(f"resuming with a config that differs from the checkpoint's in {changed}: "
                          "the result will not match the uninterrupted run", stacklevel=3)
        _load_model(trainer.accelerator.unwrap_model(trainer.model), path / "model.safetensors")
        trainer.optimizer.optimizer.load_state_dict(_load(path / "optimizer.pt"))
        if trainer.scheduler is not None and (path / "scheduler.pt").exists():
            trainer.scheduler.load_state_dict(_load(path / "scheduler.pt"))
        if trainer.accelerator.scaler is not None and (path / "scaler.pt").exists():
            trainer.accelerator.scaler.load_state_dict(_load(path / "scaler.pt"))
        saved = _load(path / "callbacks.pt")
        self._load_callbacks(metadata["callbacks"], saved["callbacks"])
        for name, phase_state in saved["phases"].items():
            if name in trainer.phases:
                trainer.phases[name].load_state_dict(phase_state)
        for name, param in trainer.accelerator.unwrap_model(trainer.model).named_parameters():
            param.requires_grad_(metadata["requires_grad"].get(name, param.requires_grad))
        trainer.run_history.load_state_dict(metadata["history"])
        trainer.state = RunState.from_dict(metadata["state"])
        trainer.state.epochs = trainer.config.train.epochs
        rng_file = path / f"rng-{trainer.accelerator.process_index}.pt"
        if metadata["processes"] != trainer.accelerator.num_processes or not rng_file.exists():
            warnings.warn(f"resume is not exact: checkpoint was written by {metadata['processes']} processes, "
                          f"this run has {trainer.accelerator.num_processes}; data shards and RNG streams differ",
                          stacklevel=3)
        else:
            process_state = _load(rng_file)
            trainer.state.train_loss_sum = process_state.pop("train_loss_sum", trainer.state.train_loss_sum)
            restore_rng(_rng_from_tensors(process_state))
        trainer.set_phase(trainer.state.phase)

    def _load_callbacks(self, names: list[str], states: list[dict[str, Any]]) -> None:
        """Give each callback the saved state of the same class, in order; warn about state left over."""
        saved = list(zip(names, states, strict=True))
        for callback in self.trainer.callbacks:
            match = next((entry for entry in saved if entry[0] == type(callback).__name__), None)
            if match is not None:
                saved.remove(match)
                callback.load_state_dict(match[1])
        leftover = [name for name, state in saved if state]
        if leftover:
            warnings.warn(f"the checkpoint holds state of callbacks this run does not have: {leftover}", stacklevel=4)


def verify(path: pathlib.Path) -> None:
    """Check every file against ``manifest.json``; raise CheckpointError naming the first bad one."""
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable manifest.json (incomplete or corrupted)") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {file.stat().st_size} bytes, "
                                  f"manifest says {expected['size']} (truncated or corrupted)")
        if _crc32(file) != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (corrupted)")


def _digest_and_sync(path: pathlib.Path) -> dict[str, Any]:
    """CRC-32 and size of a closed file, after making its contents durable."""
    fsync_path(path)
    return {"crc32": _crc32(path), "size": path.stat().st_size}


def _write_manifest(folder: pathlib.Path, files: dict[str, dict[str, Any]]) -> None:
    """Write the manifest last: a folder without a valid one is an incomplete checkpoint."""
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))
    fsync_path(manifest)
    fsync_path(folder)


def _crc32(path: pathlib.Path) -> str:
    # CRC-32 (zip's checksum) finds truncation and corruption at several GB/s; a cryptographic hash
    # would add nothing here, since an unsigned manifest can be rewritten by whoever rewrites a file,
    # and loading never executes code anyway (weights_only / safetensors).
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _load(path: pathlib.Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} as plain tensors and data ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _load_model(model: torch.nn.Module, path: pathlib.Path) -> None:
    from safetensors.torch import load_file
    saved = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    # save_model drops tied duplicates; a key missing only because it is tied is not a mismatch.
    tied = {k for k in missing if any(expected[k].data_ptr() == expected[o].data_ptr() for o in saved if o in expected)}
    missing = [k for k in missing if k not in tied]
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in saved if k in expected and saved[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(shapes)}]" if shapes else ""]
        raise CheckpointError(f"checkpoint {path.parent} does not match the configured model "
                              f"{type(model).__name__}: " + ", ".join(p for p in parts if p))
    model.load_state_dict(saved, strict=not tied)


def _rng_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                               "has_gauss": has_gauss, "cached": cached}}


def _rng_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    n = state["numpy"]
    numpy_state = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    return {**state, "numpy": numpy_state}


def _changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (run_dir and overwrite do not change the run's result)."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ("run_dir", "overwrite"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


def _latest(trainer: Trainer, metric: str) -> float | None:
    return trainer.run_history.get_latest_metric(metric) if metric in trainer.run_history.get_metric_names() else None


def _monitor_value(checkpoint: pathlib.Path) -> float | None:
    try:
        return json.loads((checkpoint / "state.json").read_text())["monitor"]["value"]
    except (OSError, ValueError, KeyError):
        return None


def _step_of(path: pathlib.Path) -> tuple[int, int]:
    try:
        epoch, step = path.name.removeprefix(".old-").split("-")[:2]
        return int(step.removeprefix("step")), int(epoch.removeprefix("epoch"))
    except ValueError:
        return -1, -1


def _version() -> str:
    from phasetrain import __version__
    return __version__
