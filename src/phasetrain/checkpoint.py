"""Checkpoints: save what a ``to_save`` mapping names, find an intact checkpoint, load it back exactly.

``to_save`` maps names to objects (as Ignite's ``to_save``): an ``nn.Module`` is written as
``<name>.safetensors``, the ``state_dict()`` of everything else into ``state.pt`` under its name, and
None is skipped.
``per_process`` objects (RNG streams, a process's running loss) are written by every process into
``process-<rank>.pt``; resumed by another number of processes, an object with ``merged_state_dict(states,
rank)`` is loaded from all of them merged, the others start afresh. ``state.json`` holds the ``RunState``,
the format and phasetrain versions, which parameters require grad, and the caller's metadata (config,
monitored value). A checkpoint folder
``RUN_DIR/checkpoints/epoch003-step0000120-checkpoint/`` is named by epoch, optimizer step and phase.
With ``keep_best``, a new best checkpoint's model weights are also copied to ``RUN_DIR/best.safetensors``.
``.pt`` files are read with ``torch.load(weights_only=True)``: loading a checkpoint cannot execute code.

Saving costs the loop only a snapshot (``phasetrain.snapshot``): every tensor to save is copied and every
state dict rebuilt, then a background thread serialises, checksums, fsyncs and publishes it while training goes on
(``checkpoint.background``). At most one write is pending: the next save, the end of the run and a signal stop
wait for it first, and its error is raised in the training thread, naming the checkpoint. ``latest`` moves
only once everything is on disk, so a kill at any moment leaves the previous checkpoint as it was.

A checkpoint is *corrupt* (CorruptCheckpoint) when its files are not what was written; ``resume("latest")``
then falls back to the newest intact one. One that is intact but does not fit the run (another model,
another format version) is refused at once: an older checkpoint of the run would not fit either.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import pathlib
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from phasetrain.checkpoint_files import publish, seal, torch_save, verify, write_error
from phasetrain.config import CheckpointConfig, RunConfig
from phasetrain.errors import CheckpointError, CorruptCheckpoint
from phasetrain.run_folder import atomic_path, best_first, follow_umask, read_latest, read_summary
from phasetrain.snapshot import Snapshot
from phasetrain.state import RunState

_T = TypeVar("_T")

FORMAT_VERSION = 3  # 3: metrics records in the checkpoint (MetricsFile state)

#: The ``to_save`` module whose weights the best checkpoint exports as ``best.safetensors``.
BEST_MODULE = "model"


class Checkpoints:
    """The checkpoints of one run folder. ``process`` is accelerate's ``PartialState`` (or anything with
    ``is_main_process``, ``process_index``, ``num_processes`` and ``wait_for_everyone()``). With ``keep_best``,
    the best checkpoint's model weights are exported to ``best_weights`` (``RUN_DIR/best.safetensors``)."""

    def __init__(self, folder: pathlib.Path, policy: CheckpointConfig, process: Any,
                 best_weights: pathlib.Path | None = None) -> None:
        self.folder, self.policy, self.process = folder, policy, process
        self.best_weights = best_weights
        self._pending: tuple[pathlib.Path, Future[None]] | None = None  # the checkpoint being written, and its write

    # ---- save -----------------------------------------------------------------------------------
    def save(self, state: RunState, to_save: Mapping[str, Any], per_process: Mapping[str, Any],
             metadata: Mapping[str, Any], *, wait: bool = False) -> pathlib.Path:
        """Write a checkpoint of the run at ``state``; returns its folder. Every process must call it.

        Returns once a snapshot is taken; the main process writes it in the background unless ``wait`` (or
        ``checkpoint.background`` is off), when every process returns only after it is on disk."""
        if state.micro_step:
            raise CheckpointError(
                f"cannot checkpoint in the middle of an optimizer step (micro-batch {state.micro_step} of it has "
                "started): its gradients are not saved, so the resume would not be exact; save at an "
                "optimizer-step boundary (on_train_step_end)")
        self.wait()  # one snapshot pending at most, and the folder's .tmp-* is no longer being written
        process, in_background = self.process, self.policy.background and not wait
        # State dicts are taken before anything is written: one that fails (callbacks and phases check theirs
        # for plain data) leaves no trace. Written in the background, they are copied: training goes on.
        process_states = {name: obj.state_dict() for name, obj in per_process.items()}
        saved = {name: obj for name, obj in to_save.items() if obj is not None} if process.is_main_process else {}
        states: Any = {name: obj.state_dict() for name, obj in saved.items()}
        # Frozen/unfrozen parameters are model state that state_dict() leaves out.
        requires_grad = {name: {key: p.requires_grad for key, p in obj.named_parameters()}
                         for name, obj in saved.items() if isinstance(obj, torch.nn.Module)}
        files = _Files(state.to_dict(), Snapshot(states) if in_background else states, requires_grad, dict(metadata))
        final = self.folder / f"epoch{state.epoch:03d}-step{state.optimizer_step:07d}-{state.phase}"
        tmp = self.folder / f".tmp-{final.name}"
        if process.is_main_process:
            for stale in self.folder.glob(".tmp-*"):  # left by a crash inside an earlier write
                shutil.rmtree(stale, ignore_errors=True)
            with self._writing(tmp, final):
                tmp.mkdir(parents=True)
        process.wait_for_everyone()
        with self._writing(tmp, final):  # a few kB of RNG state: not worth a thread
            torch_save(process_states, tmp / f"process-{process.process_index}.pt")
        process.wait_for_everyone()
        if not in_background:
            if process.is_main_process:
                self._finish(tmp, final, files)
            process.wait_for_everyone()  # every process returns with the checkpoint on disk
        elif process.is_main_process:
            self._pending = (final, _in_background(self._finish, tmp, final, files))
        return final

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is on disk (a no-op when none is);
        raise its error here, in the training thread, naming the checkpoint."""
        if self._pending is None:
            return
        final, write = self._pending
        try:
            write.result()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"writing checkpoint {final} failed ({type(exc).__name__}: {exc}); "
                                  f"{self._intact()}") from exc
        finally:
            if write.done():  # not when the wait itself was interrupted (Ctrl-C): the write is still pending
                self._pending = None

    def raise_if_failed(self) -> None:
        """Raise the error of a background write that has already failed; cheap enough for every phase."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def _finish(self, tmp: pathlib.Path, final: pathlib.Path, files: _Files) -> None:
        """Write the main process's files, seal and publish them, apply retention: on the background thread."""
        with self._writing(tmp, final):
            # A generator: each file is hashed and fsynced while the next one is written.
            seal(tmp, itertools.chain(self._write(tmp, files), sorted(tmp.glob("process-*.pt"))))
        publish(tmp, final)
        self._apply_retention(final.name)

    def _write(self, tmp: pathlib.Path, files: _Files) -> Iterator[pathlib.Path]:
        """Write the main process's files, yielding each path once it is closed. Every state dict goes into
        one ``state.pt``, written first: one fsync for all of them (each file's costs ~10 ms here), and
        it overlaps writing the weights."""
        from safetensors.torch import save_model
        states = files.states.ready() if isinstance(files.states, Snapshot) else files.states
        torch_save({name: value for name, value in states.items() if name not in files.requires_grad},
                   tmp / "state.pt")
        yield tmp / "state.pt"
        for name in files.requires_grad:
            # save_model reads only state_dict(): it drops tied duplicates as it would from the module
            save_model(_Weights(states[name]), str(tmp / f"{name}.safetensors"))  # type: ignore[arg-type]
            follow_umask(tmp / f"{name}.safetensors")
            yield tmp / f"{name}.safetensors"
        from phasetrain import __version__
        contents = {"format_version": FORMAT_VERSION, "phasetrain_version": __version__, "state": files.state,
                    "processes": self.process.num_processes, "requires_grad": files.requires_grad, **files.metadata}
        (tmp / "state.json").write_text(json.dumps(contents, indent=1))
        yield tmp / "state.json"

    @contextmanager
    def _writing(self, tmp: pathlib.Path, final: pathlib.Path) -> Iterator[None]:
        """Remove the half-written ``tmp`` on any failure; a failed write (a full disk, a file size limit, a
        read-only file system) becomes one line that says which checkpoint is still intact."""
        try:
            yield
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = write_error(exc)
            if error is None:
                raise
            raise CheckpointError(self._write_failed(error, final)) from exc

    def _write_failed(self, error: OSError, final: pathlib.Path) -> str:
        reason = error.strerror or str(error)
        advice = "free space and resume" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that and resume"
        return f"{reason[:1].lower()}{reason[1:]} writing {final}; {self._intact()} ({advice})"

    def _intact(self) -> str:
        previous = self.latest()
        return f"{previous.name} is intact" if previous else "no checkpoint was written before"

    def _apply_retention(self, newest: str) -> None:
        """Keep the ``keep_last`` newest and the ``keep_best`` best by the monitored value; delete the rest.
        A newest checkpoint that is now the best has its model weights exported (``_export_best``)."""
        policy = self.policy
        older = [c for c in self.all() if c.name != newest]  # oldest first
        newer_kept = policy.keep_last - 1  # the newest counts as one of keep_last
        keep = {newest, *(c.name for c in (older[-newer_kept:] if newer_kept > 0 else []))}
        summaries = [(c.name, read_summary(c)) for c in [*older, self.folder / newest]]
        monitored = [(s.monitor, name) for name, s in summaries if s is not None and s.monitor is not None]
        best = best_first(monitored, policy.mode)[: policy.keep_best]
        keep.update(best)
        if best and best[0] == newest:  # before any deletion: a crash leaves the previous best's file intact
            self._export_best(self.folder / newest)
        for checkpoint in older:
            if checkpoint.name not in keep:
                shutil.rmtree(checkpoint, ignore_errors=True)

    def _export_best(self, checkpoint: pathlib.Path) -> None:
        """Copy the weights of ``checkpoint`` (its ``model``) to ``best_weights``, atomically: the best model
        without opening a checkpoint, and one that outlives the checkpoint's retention."""
        weights = checkpoint / f"{BEST_MODULE}.safetensors"
        if self.best_weights is not None and weights.is_file():
            with atomic_path(self.best_weights) as tmp:
                shutil.copyfile(weights, tmp)  # the file as sealed: no second serialization

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

    def find(self, which: str | os.PathLike[str], *, from_other_run: bool = False) -> pathlib.Path:
        """``"latest"`` (falling back to the newest intact one, with a warning), a checkpoint folder, or the
        name of one in this folder; see ``resume`` for ``from_other_run``."""
        return self._first_intact(which, from_other_run, intact)[0]

    def _first_intact(self, which: str | os.PathLike[str], from_other_run: bool,
                      open_: Callable[[pathlib.Path], _T]) -> tuple[pathlib.Path, _T]:
        """The first candidate for ``which`` that ``open_`` opens, and what it returned. For ``"latest"`` a
        corrupt candidate is skipped with a warning; a checkpoint asked for by name or path is not."""
        if str(which) != "latest":
            path = self._asked_for(which, from_other_run)
            return path, open_(path)
        named = read_latest(self.folder)
        for candidate in ([named] if named and named.is_dir() else []) + [c for c in reversed(self.all()) if c != named]:
            try:
                opened = open_(candidate)
            except CorruptCheckpoint as exc:
                warnings.warn(f"skipping checkpoint: {exc}", stacklevel=5)
                continue
            if candidate != named:
                warnings.warn(f"resuming from {candidate.name}, the newest intact checkpoint "
                              f"(latest pointed to {named.name if named else 'nothing'})", stacklevel=5)
            return candidate, opened
        raise CheckpointError(f"no intact checkpoint in {self.folder} to resume from")

    def latest(self) -> pathlib.Path | None:
        """The checkpoint a resume would start from: the one ``latest`` names, else the newest."""
        named, newest = read_latest(self.folder), self.all()
        return named if named and named.is_dir() else (newest[-1] if newest else None)

    def _asked_for(self, which: str | os.PathLike[str], from_other_run: bool) -> pathlib.Path:
        """The checkpoint folder ``which`` names: a path, or a name as ``checkpoints/latest`` stores it."""
        path = pathlib.Path(which)
        if len(path.parts) == 1 and (self.folder / path).is_dir():
            path = self.folder / path
        elif not path.is_dir():
            names = ", ".join(c.name for c in self.all()) or "none yet"
            raise CheckpointError(f"checkpoint {str(which)!r} does not exist: expected a checkpoint folder, or the "
                                  f"name of one in {self.folder} ({names})")
        if path.resolve().parent != self.folder.resolve() and not from_other_run:
            # Resuming writes the other run's state into this folder: only on purpose.
            raise CheckpointError(f"checkpoint {path} belongs to run folder {_run_folder_of(path)}, not "
                                  f"{self.folder.parent}; to start this run from another run's checkpoint pass "
                                  "from_other_run=True (CLI: --from-other-run)")
        return path

    # ---- load ---------------------------------------------------------------------------------
    def resume(self, which: str | os.PathLike[str], config: RunConfig, to_load: Mapping[str, Any],
               per_process: Mapping[str, Any], *, from_other_run: bool = False,
               check: Callable[[pathlib.Path, dict[str, Any]], None] | None = None) -> tuple[pathlib.Path, RunState]:
        """Find the checkpoint ``which`` names and restore everything from it; returns its path and the
        saved run state, marked as resumed, with ``config``'s epochs and max_steps (what a changed config may change is
        the caller's rule: see ``phasetrain.resume_changes``).

        ``"latest"`` tries the checkpoints newest first and skips, with a warning, any that is corrupt,
        even one whose manifest matches but whose files the loader refuses. ``which`` may also be a
        checkpoint folder or a name from ``checkpoints/latest``; a checkpoint of another run folder is
        refused unless ``from_other_run``. ``check(path, state_json)`` may refuse the chosen checkpoint
        before anything is loaded from it.
        """
        path, contents = self._first_intact(which, from_other_run, self._read)
        if check is not None:  # the caller's last word on the chosen checkpoint, before anything is loaded
            check(path, contents.saved)
        state = self._apply(path, contents, to_load, per_process)
        state.epochs, state.max_steps, state.resumed = config.train.epochs, config.train.max_steps, True
        return path, state

    def load(self, path: pathlib.Path, to_load: Mapping[str, Any], per_process: Mapping[str, Any]) -> RunState:
        """Restore every object of ``to_load`` and ``per_process`` from ``path``; returns the saved run state.

        Every file is verified and decoded before any object is changed: a corrupt checkpoint leaves the
        run as it was."""
        return self._apply(path, self._read(path), to_load, per_process)

    def _read(self, path: pathlib.Path) -> _Contents:
        """Verify ``path`` and decode what this process loads from it; raises CorruptCheckpoint if it cannot."""
        saved = intact(path)
        try:
            state = RunState.from_dict(saved["state"])
        except TypeError as exc:
            raise CorruptCheckpoint(f"checkpoint {path}: state.json has a malformed run state ({exc})") from None
        # Every process decodes every process file (a few kB of RNG state each), so that all of them find
        # the same checkpoint corrupt and fall back together.
        processes = [_load(path / f"process-{rank}.pt") for rank in range(saved["processes"])]
        return _Contents(saved, state, _load(path / "state.pt"),
                         {name: read_weights(path / f"{name}.safetensors") for name in saved["requires_grad"]},
                         processes)

    def _apply(self, path: pathlib.Path, contents: _Contents, to_load: Mapping[str, Any],
               per_process: Mapping[str, Any]) -> RunState:
        """Load every object from ``contents``. A failure here is a checkpoint that does not fit the run."""
        modules = {name: obj for name, obj in to_load.items() if isinstance(obj, torch.nn.Module)}
        for name, module in modules.items():  # first: a model that does not fit is the error to report
            if name not in contents.weights:
                raise CheckpointError(f"checkpoint {path} holds no weights for {name!r} (it holds "
                                      f"{sorted(contents.weights)})")
            load_module(module, path, contents.weights[name], contents.saved["requires_grad"][name])
        for name, obj in to_load.items():
            if obj is not None and name not in modules and name in contents.states:
                obj.load_state_dict(contents.states[name])
        if len(contents.processes) == self.process.num_processes:
            for name, obj in per_process.items():
                obj.load_state_dict(contents.processes[self.process.process_index][name])
            return contents.state
        # Another process count: what can be merged is (a running loss: its sums); the rest starts afresh.
        for name, obj in per_process.items():
            merge = getattr(obj, "merged_state_dict", None)
            if merge is not None:
                obj.load_state_dict(merge([states[name] for states in contents.processes], self.process.process_index))
        if self.process.is_main_process:
            warnings.warn(f"resume is not bitwise exact: checkpoint was written by {len(contents.processes)} "
                          f"process(es), this run has {self.process.num_processes}; the rest of the epoch is "
                          "re-sharded from the saved position, and each process's RNG streams start afresh",
                          stacklevel=3)
        return contents.state


@dataclass
class _Files:
    """What the main process writes for one checkpoint: copies, so training can go on meanwhile."""

    state: dict[str, Any]  # the RunState, for state.json
    states: Snapshot | dict[str, Any]  # state dicts by name (a module's is its weights), copied when in the background
    requires_grad: dict[str, dict[str, bool]]  # by module name
    metadata: dict[str, Any]


class _Weights:
    """A module's saved weights, as far as safetensors' ``save_model`` looks at a module."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)  # save_model deletes the tied duplicates from what it is given


def _in_background(work: Callable[..., None], *args: Any) -> Future[None]:
    """Run ``work(*args)`` on a thread of its own; the future holds its outcome. The interpreter waits for
    that thread at exit, so a training thread that ends with a write pending still has it finished."""
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phasetrain-checkpoint")
    write = writer.submit(work, *args)
    writer.shutdown(wait=False)  # its thread ends with this write
    return write


@dataclass
class _Contents:
    """What a checkpoint holds for this process, decoded and not yet loaded into anything."""

    saved: dict[str, Any]  # state.json
    state: RunState
    states: dict[str, Any]  # state.pt: state dicts by name
    weights: dict[str, dict[str, torch.Tensor]]  # by module name
    processes: list[dict[str, Any]]  # every process's file, by rank


def intact(path: pathlib.Path) -> dict[str, Any]:
    """Check that the checkpoint folder ``path`` is as written and returns its ``state.json``: every file in
    it matches the manifest, and every file the loader reads is among them. Raises CorruptCheckpoint, or
    CheckpointError for a checkpoint of another format version."""
    listed = verify(path)
    if "state.json" not in listed:
        raise CorruptCheckpoint(f"checkpoint {path} is missing state.json")
    saved = metadata(path)
    missing = [name for name in _files_read(saved) if name not in listed]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is missing {', '.join(missing)}, which its state.json says "
                                "it holds")
    return saved


def _files_read(saved: dict[str, Any]) -> list[str]:
    """The files a resume reads (by some process) from a checkpoint whose state.json is ``saved``."""
    return ["state.json", "state.pt", *(f"{name}.safetensors" for name in saved["requires_grad"]),
            *(f"process-{rank}.pt" for rank in range(saved["processes"]))]


def metadata(path: pathlib.Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, refused when written in another format than this phasetrain reads."""
    from phasetrain import __version__
    try:
        saved = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint {path}: cannot read state.json ({exc})") from None
    if not isinstance(saved, dict):
        raise CorruptCheckpoint(f"checkpoint {path}: state.json holds a {type(saved).__name__}, not an object")
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {saved.get('format_version')} (written by phasetrain "
                              f"{saved.get('phasetrain_version', '?')}); phasetrain {__version__} reads format "
                              f"{FORMAT_VERSION}: resume it with the phasetrain version that wrote it")
    if not _well_formed(saved):
        raise CorruptCheckpoint(f"checkpoint {path}: state.json lacks a run state, config, processes count or "
                                "requires_grad map of the shape phasetrain writes")
    return saved


def _well_formed(saved: dict[str, Any]) -> bool:
    """Whether the keys the loader reads have the types ``Checkpoints._write`` writes."""
    requires_grad, processes = saved.get("requires_grad"), saved.get("processes")
    return (isinstance(saved.get("state"), dict) and isinstance(saved.get("config"), dict)
            and type(processes) is int and processes >= 1 and isinstance(requires_grad, dict)
            and all(isinstance(flags, dict) for flags in requires_grad.values()))


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
        raise CorruptCheckpoint(f"cannot load {path} as plain tensors and data ({type(exc).__name__}: "
                                f"{_why(exc)})") from exc


def _why(exc: Exception) -> str:
    """The line of a load error that says what was wrong: torch's weights_only refusal opens with a page of
    advice and names the refused global further down."""
    lines = str(exc).splitlines() or [""]
    line = next((line for line in lines if "WeightsUnpickler error:" in line), lines[0])
    return line.split("WeightsUnpickler error:")[-1].strip().split(". ")[0]


def read_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:  # a bad header, data not covered by it, an unknown dtype
        raise CorruptCheckpoint(f"cannot load {path} as safetensors ({type(exc).__name__}: {_why(exc)})") from exc


def load_module(module: torch.nn.Module, path: pathlib.Path, saved: dict[str, torch.Tensor],
                 requires_grad: dict[str, bool]) -> None:
    """Load ``saved`` (read from checkpoint ``path``) into ``module``; a CheckpointError lists any key or
    shape that does not match."""
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
        raise CheckpointError(f"checkpoint {path} does not match the configured model "
                              f"{type(module).__name__}: " + ", ".join(p for p in parts if p))
    module.load_state_dict(saved, strict=not tied)
    for name, param in module.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))


def _run_folder_of(checkpoint: pathlib.Path) -> pathlib.Path:
    """RUN_DIR for RUN_DIR/checkpoints/NAME; the parent folder of a checkpoint kept elsewhere."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _step_of(path: pathlib.Path) -> tuple[int, int]:
    try:
        epoch, step = path.name.removeprefix(".old-").split("-")[:2]
        return int(step.removeprefix("step")), int(epoch.removeprefix("epoch"))
    except ValueError:
        return -1, -1
