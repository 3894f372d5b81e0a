"""pytorch-accelerated's callbacks (``pytorch_accelerated.callbacks``): the same names, hooks and arguments.

A ``TrainerCallback`` defines any of the events in ``EVENTS``; the compat ``Trainer`` fires them from
phasetrain's own hooks (see ``phasetrain.compat.trainer``). What changed, each on purpose:

- A method named ``on_...`` that is no event (a typo) is refused when the callback is added, instead of
  being ignored forever; an ``AttributeError`` inside a callback is no longer swallowed.
- ``TerminateOnNaNCallback`` no longer calls ``sys.exit``: a non-finite training loss stops the run with
  ``phasetrain.NonFiniteLossError`` (naming the step, before the weights are updated) whether or not the
  callback is present; the callback still ends training on a non-finite eval loss.
- ``LogMetricsCallback`` prints metrics sorted by name (the order no longer changes between runs), and no
  callback sleeps.
- The stateful ones (early stopping, save-best) are part of phasetrain's checkpoints.
"""
from __future__ import annotations

import difflib
import inspect
import math
import operator
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tqdm import tqdm

    from phasetrain.compat.trainer import Trainer

#: The events a callback may define, in the order a training run fires them.
EVENTS = (
    "on_init_end", "on_training_run_start", "on_train_epoch_start", "on_train_step_start", "on_train_step_end",
    "on_train_epoch_end", "on_eval_epoch_start", "on_eval_step_start", "on_eval_step_end", "on_eval_epoch_end",
    "on_training_run_epoch_end", "on_training_run_end", "on_evaluation_run_start", "on_evaluation_run_end",
    "on_stop_training_error",
)


class StopTrainingError(Exception):
    """Raise it from a callback or a trainer method to end the training run after the current step."""


class CallbackMethodNotImplementedError(Exception):
    """Kept for code that imports it; the compat layer never raises it."""


class TrainerCallback:
    """Base class: override any event. Each receives the trainer first, then keyword arguments (the step
    events ``batch`` and ``batch_output``; ``on_train_step_end`` also ``step``, the batch's index in the epoch)."""

    def on_init_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_training_run_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_train_step_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_train_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any], **kwargs: Any) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_eval_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_eval_step_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any], **kwargs: Any) -> None: ...
    def on_eval_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_training_run_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_training_run_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_evaluation_run_start(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_evaluation_run_end(self, trainer: Trainer, **kwargs: Any) -> None: ...
    def on_stop_training_error(self, trainer: Trainer, **kwargs: Any) -> None: ...


class CallbackHandler:
    """The trainer's callbacks, in order; a class in the list is instantiated with no arguments."""

    def __init__(self, callbacks: Iterable[TrainerCallback | type[TrainerCallback]]) -> None:
        self.callbacks: list[TrainerCallback] = []
        self.add_callbacks(callbacks)

    def add_callbacks(self, callbacks: Iterable[TrainerCallback | type[TrainerCallback]]) -> None:
        for callback in callbacks:
            self.add_callback(callback)

    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        instance = callback() if isinstance(callback, type) else callback
        if not isinstance(instance, TrainerCallback):
            raise TypeError(f"{instance!r} is a {type(instance).__name__}: callbacks must subclass "
                            "phasetrain.compat.TrainerCallback")
        if type(instance) in {type(existing) for existing in self.callbacks}:
            raise ValueError(f"a second {type(instance).__name__} was added to one Trainer; callbacks present: "
                             f"{', '.join(self.callback_list)}")
        _refuse_unknown_events(instance)
        self.callbacks.append(instance)

    def __iter__(self) -> Iterator[TrainerCallback]:
        return iter(self.callbacks)

    def clear_callbacks(self) -> None:
        self.callbacks = []

    @property
    def callback_list(self) -> list[str]:
        return [type(callback).__name__ for callback in self.callbacks]

    def call_event(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Call ``event`` on every callback in order (the trainer positionally, as pytorch-accelerated does)."""
        for callback in self.callbacks:
            getattr(callback, event)(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        saved = {type(cb).__name__: getattr(cb, "state_dict", None) for cb in self.callbacks}
        return {name: state_dict() for name, state_dict in saved.items() if callable(state_dict)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if type(callback).__name__ in state and callable(getattr(callback, "load_state_dict", None)):
                callback.load_state_dict(state[type(callback).__name__])  # type: ignore[attr-defined]


def _refuse_unknown_events(callback: TrainerCallback) -> None:
    unknown = [name for name, _ in inspect.getmembers(type(callback), callable)
               if name.startswith("on_") and name not in EVENTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], EVENTS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{type(callback).__name__} defines {', '.join(unknown)}, which is no callback event{hint}; "
                         f"events: {', '.join(EVENTS)}")


# ---- built-in callbacks -----------------------------------------------------------------------------

class LogMetricsCallback(TrainerCallback):
    """Prints the latest value of every metric in the run history: those named with "train" after each
    train epoch, the others after each eval epoch. Override ``log_metrics`` to send them elsewhere."""

    def on_train_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        self._log_latest(trainer, lambda name: "train" in name)

    def on_eval_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        self._log_latest(trainer, lambda name: "train" not in name)

    def _log_latest(self, trainer: Trainer, wanted: Callable[[str], bool]) -> None:
        history = trainer.run_history
        names = sorted(name for name in history.get_metric_names() if wanted(name) and history.get_metric_values(name))
        self.log_metrics(trainer, {name: history.get_latest_metric(name) for name in names})

    def log_metrics(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            trainer.print(f"\n{name}: {value}")


class ProgressBarCallback(TrainerCallback):
    """tqdm bars over the batches of each train and eval epoch, on each machine's main process."""

    def __init__(self) -> None:
        self.pbar: tqdm | None = None
        self.eval_pbar: tqdm | None = None

    def _bar(self, trainer: Trainer, total: int | None) -> tqdm:
        from tqdm.auto import tqdm
        return tqdm(total=total, disable=not trainer.accelerator.is_local_main_process)

    def on_train_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None:
        self.pbar = self._bar(trainer, trainer.data.batches_per_epoch)

    def on_train_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any], **kwargs: Any) -> None:
        if self.pbar is not None:
            self.pbar.update(1)

    def on_train_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        if self.pbar is not None:
            self.pbar.close()

    def on_eval_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None:
        self.eval_pbar = self._bar(trainer, trainer.data.eval_batch_count(trainer.eval_dataset))

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any], **kwargs: Any) -> None:
        if self.eval_pbar is not None:
            self.eval_pbar.update(1)

    def on_eval_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        if self.eval_pbar is not None:
            self.eval_pbar.close()


class PrintProgressCallback(TrainerCallback):
    """Prints where the run is: run start and end, each epoch, each evaluation."""

    def on_training_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print("\nStarting training run")

    def on_train_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print(f"\nStarting epoch {trainer.run_history.current_epoch}")

    def on_training_run_end(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print("Finishing training run")

    def on_eval_epoch_start(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print("\nStarting eval epoch")

    def on_evaluation_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print("\nStarting evaluation run")

    def on_evaluation_run_end(self, trainer: Trainer, **kwargs: Any) -> None:
        trainer.print("Finishing evaluation run")


class SaveBestModelCallback(TrainerCallback):
    """Saves a checkpoint (``trainer.save_checkpoint``) whenever ``watch_metric`` improves at an epoch's end,
    and loads the best one back when training ends (``load_saved_checkpoint``)."""

    def __init__(self, save_path: str = "best_model.pt", watch_metric: str = "eval_loss_epoch",
                 greater_is_better: bool = False, reset_on_train: bool = True, save_optimizer: bool = True,
                 save_scheduler: bool = True, load_saved_checkpoint: bool = True) -> None:
        self.save_path, self.watch_metric, self.greater_is_better = save_path, watch_metric, greater_is_better
        self.operator = operator.gt if greater_is_better else operator.lt
        self.reset_on_train, self.save_optimizer, self.save_scheduler = reset_on_train, save_optimizer, save_scheduler
        self.load_saved_checkpoint = load_saved_checkpoint
        self.best_metric: float | None = None
        self.best_metric_epoch: int | None = None

    def on_training_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        if self.reset_on_train and not trainer.state.resumed:
            self.best_metric = None

    def on_training_run_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        current = float(trainer.run_history.get_latest_metric(self.watch_metric))
        if self.best_metric is None or self.operator(current, self.best_metric):
            self.best_metric, self.best_metric_epoch = current, trainer.run_history.current_epoch
            trainer.save_checkpoint(save_path=self.save_path, checkpoint_kwargs={self.watch_metric: current},
                                    save_optimizer=self.save_optimizer, save_scheduler=self.save_scheduler)

    def on_training_run_end(self, trainer: Trainer, **kwargs: Any) -> None:
        if self.load_saved_checkpoint and self.best_metric is not None:
            trainer.print(f"Loading checkpoint with {self.watch_metric}: {self.best_metric} "
                          f"from epoch {self.best_metric_epoch}")
            trainer.load_checkpoint(self.save_path, load_optimizer=self.save_optimizer,
                                    load_scheduler=self.save_scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_metric_epoch": self.best_metric_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric, self.best_metric_epoch = state["best_metric"], state["best_metric_epoch"]


class EarlyStoppingCallback(TrainerCallback):
    """Ends training when ``watch_metric`` has not improved by more than ``early_stopping_threshold`` for
    ``early_stopping_patience`` epochs in a row (checked at each epoch's end)."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.01,
                 watch_metric: str = "eval_loss_epoch", greater_is_better: bool = False,
                 reset_on_train: bool = True) -> None:
        self.early_stopping_patience, self.early_stopping_threshold = early_stopping_patience, early_stopping_threshold
        self.watch_metric, self.greater_is_better, self.reset_on_train = watch_metric, greater_is_better, reset_on_train
        self.operator = operator.gt if greater_is_better else operator.lt
        self.best_metric: float | None = None
        self.early_stopping_patience_counter = 0

    def on_training_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        if self.reset_on_train and not trainer.state.resumed:
            self.best_metric, self.early_stopping_patience_counter = None, 0

    def on_training_run_epoch_end(self, trainer: Trainer, **kwargs: Any) -> None:
        current = float(trainer.run_history.get_latest_metric(self.watch_metric))
        if self.best_metric is None:
            self.best_metric = current
        elif self.operator(current, self.best_metric) and abs(current - self.best_metric) > self.early_stopping_threshold:
            trainer.print(f"\nImprovement of {abs(current - self.best_metric)} observed, resetting counter. ")
            self.best_metric, self.early_stopping_patience_counter = current, 0
            self._print_counter(trainer)
        else:
            trainer.print("No improvement above threshold observed, incrementing counter. ")
            self.early_stopping_patience_counter += 1
            self._print_counter(trainer)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            raise StopTrainingError(f"Stopping training due to no improvement after "
                                    f"{self.early_stopping_patience} epochs")

    def _print_counter(self, trainer: Trainer) -> None:
        trainer.print(f"Early stopping counter: {self.early_stopping_patience_counter}/{self.early_stopping_patience}")

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "counter": self.early_stopping_patience_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric, self.early_stopping_patience_counter = state["best_metric"], int(state["counter"])


class TerminateOnNaNCallback(TrainerCallback):
    """Ends training on a non-finite eval loss. A non-finite *training* loss needs no callback: phasetrain
    stops the run at that optimizer step, before the weights are updated (``NonFiniteLossError``)."""

    def __init__(self) -> None:
        self.triggered = False

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any], **kwargs: Any) -> None:
        loss = batch_output["loss"]
        if not math.isfinite(float(loss.detach().float().sum())):  # one sync per eval batch, as before
            self.triggered = True
            raise StopTrainingError("Stopping training due to NaN loss in validation step")


class MoveModulesToDeviceCallback(TrainerCallback):
    """Moves every ``nn.Module`` attribute of the trainer other than ``model`` (a loss module, metrics kept
    on a subclass) to the trainer's device when a training or evaluation run starts."""

    def _move(self, trainer: Trainer) -> None:
        for name, module in vars(trainer).items():
            if name != "model" and isinstance(module, torch.nn.Module):
                module.to(trainer.device)

    def on_training_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        self._move(trainer)

    def on_evaluation_run_start(self, trainer: Trainer, **kwargs: Any) -> None:
        self._move(trainer)


class LimitBatchesCallback(TrainerCallback):
    """Debugging: train and evaluate on the first ``num_batches`` batches of each epoch
    (phasetrain's ``train.limit_batches``, which the compat Trainer sets from this callback)."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches


class ConvertSyncBatchNormCallback(TrainerCallback):
    """BatchNorm layers become SyncBatchNorm on several processes (phasetrain's ``train.sync_batchnorm``,
    done before the model is wrapped for data parallelism, where it takes effect)."""


#: pytorch-accelerated's environment variable for LimitBatchesCallback, honoured the same way.
LIMIT_BATCHES_ENV_VAR = "PT_ACC_LIMIT_BATCHES"


def limit_batches_from_env() -> int | None:
    value = os.getenv(LIMIT_BATCHES_ENV_VAR)
    return None if value is None or value.lower() == "none" else int(value)


def get_default_callbacks(progress_bar: bool = True) -> tuple[type[TrainerCallback], ...]:
    """The default callbacks, without the progress bar when ``progress_bar`` is False."""
    return (MoveModulesToDeviceCallback, TerminateOnNaNCallback, PrintProgressCallback,
            *((ProgressBarCallback,) if progress_bar else ()), LogMetricsCallback)
