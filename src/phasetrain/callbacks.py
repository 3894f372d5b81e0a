"""Callbacks: side effects bound to the run's hooks (phase enter/exit, steps, logging).

A callback subclasses ``Callback`` and defines any of the hook methods below. A method named
``on_...`` that matches no hook (a typo, or a phase that is not in the graph) is an error when the
trainer is built, never silently ignored. Progress bars, console lines, the run history and
``metrics.jsonl`` are callbacks too, replaceable like any other.
"""
from __future__ import annotations

import inspect
import json
import math
import pathlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from phasetrain.errors import CallbackError
from phasetrain.history import add_record
from phasetrain.timing import shares

if TYPE_CHECKING:
    from tqdm import tqdm

    from phasetrain.steps import TrainerSteps
    from phasetrain.trainer import Trainer

#: Hooks every run has. Phase hooks ``on_enter_<phase>`` / ``on_exit_<phase>`` exist for each phase.
RUN_HOOKS = (
    "on_run_start", "on_run_end",
    "on_train_step_start", "on_before_backward", "on_after_backward", "on_train_batch_end", "on_train_step_end",
    "on_eval_step_start", "on_eval_step_end",
    "on_log", "on_exception",
)


class Callback:
    """Base class. Override any hook; each receives the trainer first.

    - ``on_run_start(trainer)`` / ``on_run_end(trainer)``
    - ``on_enter_<phase>(trainer)`` / ``on_exit_<phase>(trainer)`` for every phase in the graph
      (``done`` is final: it has ``on_enter_done`` only)
    - ``on_train_step_start(trainer)``: before the first micro-batch of an optimizer step
    - ``on_before_backward(trainer, loss)`` / ``on_after_backward(trainer)``: each micro-batch
    - ``on_train_batch_end(trainer, batch, batch_output)``: each micro-batch, after its backward; the
      batch on the device and ``calculate_train_batch_loss``'s dict (``loss``, ``model_outputs``,
      ``batch_size``): train metrics need no override
    - ``on_train_step_end(trainer, loss)``: after the optimizer step; ``loss`` is a detached tensor
    - ``on_eval_step_start(trainer)`` / ``on_eval_step_end(trainer, batch, batch_output)``
    - ``on_log(trainer, record)``: a record ``{"phase", "epoch", "step", "kind", ...}``: ``kind`` is
      ``"step"`` or ``"epoch"`` (with metrics such as ``"train/loss"``), or ``"phase"`` (a phase visit that
      ended, no metrics); step, train epoch and phase records carry a ``"time"`` mapping (seconds, rates)
    - ``on_exception(trainer, exception)``: the run is ending with ``exception`` (a stop signal's
      ``RunInterrupted`` included), instead of ``on_run_end``

    Enter and exit hooks pair up within a process: a resumed run re-enters the phase its checkpoint
    was taken in, firing ``on_enter_<phase>`` again with ``trainer.state.resumed`` set.

    Call ``trainer.request_stop(reason)`` to end the run at the next phase boundary. Stateful
    callbacks implement ``state_dict``/``load_state_dict`` so checkpoints keep their state.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class CallbackList:
    """Callbacks in firing order, checked against the hook names of a graph's phases, dispatched per hook."""

    def __init__(self, callbacks: Iterable[Callback], phases: Iterable[str]) -> None:
        self.callbacks = list(callbacks)
        self._phases = list(phases)
        # `done` is final: it is entered, never exited.
        hook_names = (set(RUN_HOOKS) | {f"on_enter_{p}" for p in self._phases}
                      | {f"on_exit_{p}" for p in self._phases if p != "done"})
        self._unknown = [(callback, _unknown_hooks(callback, hook_names)) for callback in self.callbacks]
        for callback, unknown in self._unknown:
            # A typo is refused now; a phase hook may name a phase that add_phase adds later: check() at run().
            if any(not name.startswith(("on_enter_", "on_exit_")) for name in unknown):
                self._refuse(callback, unknown)
            _refuse_old_signatures(callback)
        # Precompute the bound methods per hook: dispatch in the batch loop is one dict lookup.
        self._hooks: dict[str, list[Callable[..., Any]]] = {
            name: [getattr(cb, name) for cb in self.callbacks if callable(getattr(cb, name, None))]
            for name in hook_names
        }

    def check(self) -> None:
        """Refuse any callback with a hook that matches nothing in the graph as it now is."""
        for callback, unknown in self._unknown:
            if unknown:
                self._refuse(callback, unknown)

    def _refuse(self, callback: Callback, unknown: list[str]) -> None:
        raise CallbackError(
            f"{type(callback).__name__} defines {', '.join(unknown)}, which match no hook. "
            f"Phase hooks are on_enter_<phase>/on_exit_<phase> for the phases {', '.join(self._phases)} (done has "
            f"no exit; a phase added with add_phase before run() counts); other hooks: {', '.join(RUN_HOOKS)}")

    def fire(self, name: str, trainer: TrainerSteps, *args: Any) -> None:
        for hook in self._hooks.get(name, ()):
            hook(trainer, *args)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def state_dict(self) -> dict[str, Any]:
        from phasetrain.checkpoint import plain
        return {"callbacks": [(type(cb).__name__, plain(cb.state_dict(), f"{type(cb).__name__}.state_dict()"))
                              for cb in self.callbacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each callback the saved state of the same class, in order; warn about state left over."""
        saved = [tuple(entry) for entry in state["callbacks"]]
        for callback in self.callbacks:
            match = next((entry for entry in saved if entry[0] == type(callback).__name__), None)
            if match is not None:
                saved.remove(match)
                callback.load_state_dict(match[1])
        leftover = [name for name, callback_state in saved if callback_state]
        if leftover:
            warnings.warn(f"the checkpoint holds state of callbacks this run does not have: {leftover}", stacklevel=4)


def with_callbacks(current: list[Callback], added: list[Callback], defaults: list[Callback]) -> list[Callback]:
    """``current`` then ``added``; an added callback of a default's class (or a subclass) replaces that default."""
    default_types = {type(cb) for cb in defaults}
    kept = [cb for cb in current if not (type(cb) in default_types and any(isinstance(new, type(cb)) for new in added))]
    return kept + added


#: Hooks whose arguments changed: the number of arguments after ``trainer`` an old hook takes, and the call now.
_CHANGED_HOOKS = {"on_eval_step_end": (1, "(trainer, batch, batch_output) since phasetrain 0.3")}


def _refuse_old_signatures(callback: Callback) -> None:
    """A hook written for an older phasetrain fails at its first call, mid-run; say so when it is registered."""
    for name, (before, now) in _CHANGED_HOOKS.items():
        hook = getattr(type(callback), name, None)
        if hook is None:
            continue
        parameters = list(inspect.signature(hook).parameters.values())[2:]  # after self and trainer
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) == before and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
            raise CallbackError(f"{type(callback).__name__}.{name} takes {before} argument after trainer, but the "
                                f"hook is called with {now}: add the missing parameter")


def _unknown_hooks(callback: Callback, hook_names: set[str]) -> list[str]:
    if not isinstance(callback, Callback):
        raise CallbackError(f"{callback!r} is a {type(callback).__name__}: callbacks must subclass phasetrain.Callback")
    return sorted(n for n in dir(callback) if n.startswith("on_") and n not in hook_names)


# ---- built-in callbacks ------------------------------------------------------------------------

class ProgressBar(Callback):
    """tqdm bars for train and eval epochs, on the main process only."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def _open(self, trainer: Trainer, total: int | None, initial: int, desc: str) -> None:
        if trainer.accelerator.is_local_main_process:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit="step")

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        state = trainer.state  # a resumed epoch is re-entered with its finished steps counted
        self._open(trainer, trainer.data.steps_per_epoch, state.optimizer_step - state.epoch_start_step,
                   f"epoch {state.epoch}/{state.epochs}")

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if self._bar is not None:
            self._bar.update()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._bar is not None and "train/loss" in record:
            self._bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self._close()

    def on_enter_eval_epoch(self, trainer: Trainer) -> None:
        self._open(trainer, trainer.data.eval_batch_count(trainer.data.eval), 0, "eval")

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update()

    def on_exit_eval_epoch(self, trainer: Trainer) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._close()  # so the error line that follows starts on a line of its own

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ConsoleSummary(Callback):
    """One line per epoch, printed when the epoch's last phase has ended: its metrics, the train throughput
    and each phase's seconds. At the end, the share of the run's time each phase took (the whole run's,
    across resumes: the totals are saved with checkpoints) and where the outputs are. Main process only.

    Example line::

        epoch 3/15  train/loss 0.2412  train/lr 0.0020  eval/loss 0.2157  eval/accuracy 0.9405  | 2890 samples/s  train_epoch 0.41 s  eval_epoch 0.03 s  checkpoint 0.02 s
    """

    def __init__(self) -> None:
        self.phase_seconds: dict[str, float] = {}  # every phase's total over the run
        self._label: str | None = None  # the pending line's: "epoch 3/15", or "end" for what the done phase logs
        self._metrics: dict[str, float] = {}
        self._rate: float | None = None
        self._phases: dict[str, float] = {}

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] not in ("epoch", "phase") or not trainer.accelerator.is_main_process:
            return
        label = "end" if record["phase"] == "done" else f"epoch {record['epoch']}/{trainer.state.epochs}"
        if label != self._label:
            self._flush()
            self._label = label
        if record["kind"] == "phase":
            phase, seconds = record["phase"], record["time"]["seconds"]
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds
            self._phases[phase] = self._phases.get(phase, 0.0) + seconds
            return
        self._metrics.update((k, v) for k, v in record.items() if "/" in k)
        self._rate = record.get("time", {}).get("samples_per_s", self._rate)

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self._flush()  # the previous epoch's phases have all ended

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._flush()

    def on_run_end(self, trainer: Trainer) -> None:
        self._flush()
        if not trainer.accelerator.is_main_process:
            return
        if trainer.config.train.fast_dev_run:
            say(f"fast_dev_run: every phase ran on one batch; nothing was written to {trainer.config.run_dir}")
            return
        folder = trainer.run_folder
        say(f"{time_per_phase(self.phase_seconds)}\nrun folder: {folder.path}\n  weights: {folder.final_weights}\n"
            f"  metrics: {folder.metrics}\n  config:  {folder.config_file}")

    def _flush(self) -> None:
        if self._label is not None and self._metrics:  # setup's time alone makes no line: it is in the totals
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in self._metrics.items())
            times = [f"{self._rate:.0f} samples/s"] if self._rate is not None else []
            times += [f"{phase} {seconds:.2f} s" for phase, seconds in self._phases.items()]
            say(f"{self._label}  {metrics}  | {'  '.join(times)}")
        self._label, self._metrics, self._rate, self._phases = None, {}, None, {}

    def state_dict(self) -> dict[str, Any]:
        return {"phase_seconds": dict(self.phase_seconds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase_seconds = {str(k): float(v) for k, v in state.get("phase_seconds", {}).items()}


def time_per_phase(seconds: dict[str, float]) -> str:
    """``time per phase: train_epoch 81% (12.31 s), eval_epoch 12% (1.80 s), ...``, largest first."""
    if not seconds:
        return "time per phase: none measured"
    return "time per phase: " + ", ".join(f"{phase} {share:.0f}% ({s:.2f} s)" for phase, s, share in shares(seconds))


class HistoryRecorder(Callback):
    """Keeps ``trainer.run_history`` up to date with every epoch-level record."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        add_record(trainer.run_history, record)


class MetricsFile(Callback):
    """Appends every record to ``RUN_DIR/metrics.jsonl`` (one strict-JSON object a line; main process only).

    The records written so far are part of the checkpoint. A resumed run rewrites the file, atomically,
    to exactly the checkpoint's records: the ones written after the checkpoint are written again by the
    resumed run, and a file that a kill, a cut or a deletion left short is rebuilt, never glued onto.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._restored = False

    def on_run_start(self, trainer: Trainer) -> None:
        if trainer.accelerator.is_main_process and self._restored:
            self._rewrite(self.path(trainer))

    def _rewrite(self, path: pathlib.Path) -> None:
        from phasetrain.run_folder import atomic_write_text
        saved = "".join(self._lines)
        current = path.read_text(errors="replace") if path.is_file() else None
        if current is None and not saved:  # nothing was logged before the checkpoint
            return
        if current is None or not current.startswith(saved):
            state = "missing" if current is None else "shorter than the checkpoint's records, or changed"
            warnings.warn(f"{path} was {state}: rebuilt from the checkpoint ({len(self._lines)} records)", stacklevel=2)
        if current != saved:
            atomic_write_text(path, saved)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.accelerator.is_main_process:
            line = json.dumps(strict_json(record), allow_nan=False) + "\n"
            path = self.path(trainer)
            try:
                with open(path, "a") as file:
                    file.write(line)
            except OSError as exc:  # a write error names no file: name it
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            self._lines.append(line)

    @staticmethod
    def path(trainer: Trainer) -> pathlib.Path:
        return trainer.run_folder.metrics

    def logged(self) -> list[dict[str, Any]]:
        """The records written so far (after a resume: those of its checkpoint, then the new ones)."""
        return [json.loads(line) for line in self._lines]

    def state_dict(self) -> dict[str, Any]:
        return {"records": "".join(self._lines)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lines = str(state["records"]).splitlines(keepends=True)
        self._restored = True


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as null, at any depth, as JSON has no literal for them (strict
    parsers refuse Python's bare ``NaN``; JavaScript's JSON.stringify writes null too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


class EarlyStopping(Callback):
    """Stops the run when ``monitor`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_evaluations = 0
        self._warned = False

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] != "epoch":
            return
        if self.monitor not in record:
            prefix = self.monitor.split("/")[0] + "/"
            if not self._warned and any(k.startswith(prefix) for k in record):  # a record it should be in
                self._warned = True
                warnings.warn(f"EarlyStopping monitors {self.monitor!r}, which this run does not log; "
                              f"records have {sorted(k for k in record if '/' in k)}", stacklevel=2)
            return
        value = record[self.monitor]
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.bad_evaluations = value, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            trainer.request_stop(f"early stopping: {self.monitor} did not improve for {self.patience} evaluations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evaluations = state["best"], int(state["bad_evaluations"])


def default_callbacks(progress_bar: bool = True) -> list[Callback]:
    """What every run gets unless the trainer's ``default_callbacks`` is overridden."""
    return [HistoryRecorder(), MetricsFile(), ConsoleSummary(), *([ProgressBar()] if progress_bar else [])]


def say(text: str) -> None:
    """A line on the console that does not break a progress bar."""
    from tqdm.auto import tqdm
    tqdm.write(text)
