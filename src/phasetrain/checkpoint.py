"""Checkpoints: save what a ``to_save`` mapping names, find an intact checkpoint, load it back exactly.

``to_save`` maps names to objects (as Ignite's ``to_save``): an ``nn.Module`` is written as
``<name>.safetensors``, the ``state_dict()`` of everything else into ``state.pt`` under its name, and
None is skipped.
``per_process`` objects (RNG streams, a process's running loss) are written by every process into
``process-<rank>.pt``. ``state.json`` holds the ``RunState``, the format and phasetrain versions, which
parameters require grad, and the caller's metadata (config, monitored value). A checkpoint folder
``RUN_DIR/checkpoints/epoch003-step0000120-checkpoint/`` is named by epoch, optimizer step and phase.
``.pt`` files are read with ``torch.load(weights_only=True)``: loading a checkpoint cannot execute code.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from phasetrain.checkpoint_files import publish, seal, verify
from phasetrain.config import CheckpointConfig, RunConfig
from phasetrain.errors import CheckpointError
from phasetrain.state import RunState

FORMAT_VERSION = 2


class Checkpoints:
    """The checkpoints of one run folder. ``process`` is accelerate's ``PartialState`` (or anything with
    ``is_main_process``, ``process_index``, ``num_processes`` and ``wait_for_everyone()``)."""

    def __init__(self, folder: pathlib.Path, policy: CheckpointConfig, process: Any) -> None:
        self.folder, self.policy, self.process = folder, policy, process

    # ---- save ---------------------------------------------------------------------------------
    def save(self, state: RunState, to_save: Mapping[str, Any], per_process: Mapping[str, Any],
             metadata: Mapping[str, Any]) -> pathlib.Path:
        """Write a checkpoint of the run at ``state``; returns its folder. Every process must call it."""
        if state.micro_step:
            raise CheckpointError(
                f"cannot checkpoint in the middle of an optimizer step (micro-batch {state.micro_step} of it has "
                "started): its gradients are not saved, so the resume would not be exact; save at an "
                "optimizer-step boundary (on_train_step_end)")
        process = self.process
        # State dicts are taken before anything is written: one that fails (callbacks and phases check
        # theirs for plain data) leaves no trace.
        process_states = {name: obj.state_dict() for name, obj in per_process.items()}
        states = {name: obj if isinstance(obj, torch.nn.Module) else obj.state_dict()
                  for name, obj in to_save.items() if obj is not None} if process.is_main_process else {}
        final = self.folder / f"epoch{state.epoch:03d}-step{state.optimizer_step:07d}-{state.phase}"
        tmp = self.folder / f".tmp-{final.name}"
        if process.is_main_process:
            for stale in self.folder.glob(".tmp-*"):  # left by a crash inside an earlier write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        process.wait_for_everyone()
        torch.save(process_states, tmp / f"process-{process.process_index}.pt")
        process.wait_for_everyone()
        if process.is_main_process:
            try:
                # A generator: each file is hashed and fsynced while the next one is written.
                seal(tmp, itertools.chain(self._write(tmp, state, states, metadata), sorted(tmp.glob("process-*.pt"))))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk, say) leaves no half folder
                raise
            publish(tmp, final)
            self._apply_retention(final.name)
        process.wait_for_everyone()
        return final

    def _write(self, tmp: pathlib.Path, state: RunState, states: Mapping[str, Any],
               metadata: Mapping[str, Any]) -> Iterator[pathlib.Path]:
        """Write the main process's files, yielding each path once it is closed. Every state dict goes into
        one ``state.pt``, written first: one fsync for all of them (each file's costs ~10 ms here), and
        it overlaps writing the weights."""
        from safetensors.torch import save_model
        torch.save({name: value for name, value in states.items() if not isinstance(value, torch.nn.Module)},
                   tmp / "state.pt")
        yield tmp / "state.pt"
        requires_grad: dict[str, dict[str, bool]] = {}
        for name, module in states.items():
            if isinstance(module, torch.nn.Module):
                save_model(module, str(tmp / f"{name}.safetensors"))
                # Frozen/unfrozen parameters are model state that state_dict() leaves out.
                requires_grad[name] = {key: p.requires_grad for key, p in module.named_parameters()}
                yield tmp / f"{name}.safetensors"
        from phasetrain import __version__
        contents = {"format_version": FORMAT_VERSION, "phasetrain_version": __version__, "state": state.to_dict(),
                    "processes": self.process.num_processes, "requires_grad": requires_grad, **metadata}
        (tmp / "state.json").write_text(json.dumps(contents, indent=1))
        yield tmp / "state.json"

    def _apply_retention(self, newest: str) -> None:
        """Keep the ``keep_last`` newest and the ``keep_best`` best by the monitored value; delete the rest."""
        policy = self.policy
        older = [c for c in self.all() if c.name != newest]  # oldest first
        newer_kept = policy.keep_last - 1  # the newest counts as one of keep_last
        keep = {newest, *(c.name for c in (older[-newer_kept:] if newer_kept > 0 else []))}
        ranked = [(v, c.name) for c in [*older, self.folder / newest] if (v := _monitor_value(c)) is not None]
        ranked.sort(reverse=policy.mode == "max")
        keep.update(name for _, name in ranked[: policy.keep_best])
        for checkpoint in older:
            if checkpoint.name not in keep:
                shutil.rmtree(checkpoint, ignore_errors=True)

    # ---- find ---------------------------------------------------------------------------------
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
        for candidate in ([named] if named and named.exists() else []) + [c for c in reversed(self.all()) if c != named]:
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
    def resume(self, which: str | os.PathLike[str], config: RunConfig, to_load: Mapping[str, Any],
               per_process: Mapping[str, Any]) -> tuple[pathlib.Path, RunState]:
        """Find the checkpoint ``which`` names, warn when ``config`` differs from the one it was saved with,
        and restore everything from it; returns its path and the saved run state, marked as resumed."""
        path = self.find(which)
        changed = config_changes(metadata(path)["config"], config.to_dict())
        if changed:
            warnings.warn(f"resuming with a config that differs from the checkpoint's in {changed}: "
                          "the result will not match the uninterrupted run", stacklevel=4)
        state = self.load(path, to_load, per_process)
        state.epochs, state.resumed = config.train.epochs, True
        return path, state

    def load(self, path: pathlib.Path, to_load: Mapping[str, Any], per_process: Mapping[str, Any]) -> RunState:
        """Restore every object of ``to_load`` and ``per_process`` from ``path``; returns the saved run state."""
        saved = metadata(path)
        states = _load(path / "state.pt")
        for name, obj in to_load.items():
            if isinstance(obj, torch.nn.Module):
                _load_module(obj, path / f"{name}.safetensors", saved["requires_grad"].get(name, {}))
            elif obj is not None and name in states:
                obj.load_state_dict(states[name])
        process_file = path / f"process-{self.process.process_index}.pt"
        if saved["processes"] != self.process.num_processes or not process_file.exists():
            warnings.warn(f"resume is not exact: checkpoint was written by {saved['processes']} processes, "
                          f"this run has {self.process.num_processes}; data shards and RNG streams differ",
                          stacklevel=3)
        else:
            states = _load(process_file)
            for name, obj in per_process.items():
                obj.load_state_dict(states[name])
        return RunState.from_dict(saved["state"])


def metadata(path: pathlib.Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, refused when written in another format than this phasetrain reads."""
    from phasetrain import __version__
    saved: dict[str, Any] = json.loads((path / "state.json").read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {saved.get('format_version')} (written by phasetrain "
                              f"{saved.get('phasetrain_version', '?')}); phasetrain {__version__} reads format "
                              f"{FORMAT_VERSION}: resume it with the phasetrain version that wrote it")
    return saved


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (run_dir and overwrite do not change the run's result)."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ("run_dir", "overwrite"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


#: What torch.load(weights_only=True) reads back: anything else in a state dict would save and then fail to load.
_PLAIN_TYPES = (str, int, float, bool, complex, bytes, bytearray, type(None), torch.dtype, torch.device)


def plain(value: Any, where: str) -> Any:
    """``value`` itself, after checking it holds only tensors and plain data; a CheckpointError names the first
    value that does not (numpy scalars are a common one: they subclass float but do not load safely)."""
    if isinstance(value, torch.Tensor | torch.Size):
        return value
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            plain(key, f"{where} key {key!r}")
            plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set):
        for index, item in enumerate(value):
            plain(item, f"{where}[{index}]")
    elif type(value) not in _PLAIN_TYPES:
        raise CheckpointError(f"cannot checkpoint {where}: a {type(value).__module__}.{type(value).__qualname__} is not "
                              "plain data; state_dict() may hold tensors, numbers, strings, bools, None, lists, tuples "
                              "and dicts only (convert it, e.g. float(value) or torch.tensor(value))")
    return value


def _load(path: pathlib.Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} as plain tensors and data ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _load_module(module: torch.nn.Module, path: pathlib.Path, requires_grad: dict[str, bool]) -> None:
    from safetensors.torch import load_file
    saved = load_file(str(path))
    expected = module.state_dict()
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
                              f"{type(module).__name__}: " + ", ".join(p for p in parts if p))
    module.load_state_dict(saved, strict=not tied)
    for name, param in module.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))


def _monitor_value(checkpoint: pathlib.Path) -> float | None:
    try:
        return json.loads((checkpoint / "state.json").read_text())["monitor"]
    except (OSError, ValueError, KeyError):
        return None


def _step_of(path: pathlib.Path) -> tuple[int, int]:
    try:
        epoch, step = path.name.removeprefix(".old-").split("-")[:2]
        return int(step.removeprefix("step")), int(epoch.removeprefix("epoch"))
    except ValueError:
        return -1, -1
