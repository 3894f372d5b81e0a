"""pytorch-accelerated's ``Trainer`` on phasetrain's phase graph: a thin mapping, not a second loop.

``train()`` turns its arguments into a ``RunConfig`` and runs phasetrain's own walk
``setup -> train_epoch -> eval_epoch -> epoch_end -> checkpoint -> done``; ``epoch_end`` is the one phase
this layer adds (pytorch-accelerated's ``training_run_epoch_end``). The override points share their names
with phasetrain's (``calculate_train_batch_loss``, ``backward_step``, ``optimizer_step``,
``scheduler_step``, ``train_epoch_start``, ...), so a subclass's methods run in phasetrain's loop as they
are. Callback events are fired from phasetrain's hooks by ``EventBridge``.

What is different, on purpose (docs/migrating-from-pytorch-accelerated.md lists each with its reason):
gradients are clipped on the optimizer step only, not on every micro-batch; the logged train loss is the
true mean, not divided by the accumulation steps; no host sync per batch; ``NUM_UPDATE_STEPS_PER_EPOCH``
is the number of optimizer steps each process takes, the number its scheduler steps through; a NaN loss
raises ``NonFiniteLossError`` instead of ``sys.exit``; with ``run_dir=...`` every epoch is checkpointed
and ``train(..., resume_from="latest")`` continues bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator

from phasetrain.callbacks import Callback, MetricsFile
from phasetrain.compat.callbacks import (
    EVENTS,
    CallbackHandler,
    ConvertSyncBatchNormCallback,
    LimitBatchesCallback,
    LogMetricsCallback,
    MoveModulesToDeviceCallback,
    PrintProgressCallback,
    ProgressBarCallback,
    StopTrainingError,
    TerminateOnNaNCallback,
    TrainerCallback,
    limit_batches_from_env,
)
from phasetrain.compat.run_config import TrainerRunConfig
from phasetrain.compat.tracking import InMemoryRunHistory, RunHistory
from phasetrain.config import RunConfig, TrainConfig
from phasetrain.errors import ConfigError
from phasetrain.phases import Phase
from phasetrain.trainer import Trainer as CoreTrainer

DEFAULT_CALLBACKS = (MoveModulesToDeviceCallback, TerminateOnNaNCallback, PrintProgressCallback,
                     ProgressBarCallback, LogMetricsCallback)


class TrainerPlaceholderValues(Enum):
    """Numbers only the training run knows, for ``create_scheduler_fn`` partials::

        create_scheduler_fn = partial(OneCycleLR, max_lr=0.01, epochs=TrainerPlaceholderValues.NUM_EPOCHS,
                                      steps_per_epoch=TrainerPlaceholderValues.NUM_UPDATE_STEPS_PER_EPOCH)

    ``NUM_UPDATE_STEPS_PER_EPOCH`` is the number of optimizer steps *each process* takes per epoch (its
    scheduler steps that often), with accumulation counted; ``PER_PROCESS_NUM_UPDATE_STEPS_PER_EPOCH`` is
    the same number. ``placeholder * 2`` and ``placeholder + 1`` work too.
    """

    NUM_EPOCHS = "epochs"
    NUM_UPDATE_STEPS_PER_EPOCH = "steps_per_epoch"
    PER_PROCESS_NUM_UPDATE_STEPS_PER_EPOCH = "per_process_steps_per_epoch"
    TRAIN_DATALOADER_LEN = "train_batches"
    EVAL_DATALOADER_LEN = "eval_batches"
    PER_PROCESS_BATCH_SIZE = "batch_size"
    EVAL_BATCH_SIZE = "eval_batch_size"

    @classmethod
    def placeholder_set(cls) -> set[str]:
        return {member.name for member in cls}

    def __mul__(self, other: int) -> _Expression:
        return _Expression(self, times=other)

    def __add__(self, other: int) -> _Expression:
        return _Expression(self, plus=other)

    def __sub__(self, other: int) -> _Expression:
        raise TypeError(f"TrainerPlaceholderValues.{self.name} - {other}: only * and + are supported; write the "
                        "expression with them (as pytorch-accelerated asks)")


class _Expression:
    """``placeholder * times + plus``, resolved with the placeholder."""

    def __init__(self, placeholder: TrainerPlaceholderValues, times: int = 1, plus: int = 0) -> None:
        self.placeholder, self.times, self.plus = placeholder, times, plus

    def __mul__(self, other: int) -> _Expression:
        return _Expression(self.placeholder, self.times * other, self.plus * other)

    def __add__(self, other: int) -> _Expression:
        return _Expression(self.placeholder, self.times, self.plus + other)

    def resolve(self, values: dict[str, int | None]) -> int:
        return _value(self.placeholder, values) * self.times + self.plus


def _value(placeholder: TrainerPlaceholderValues, values: dict[str, int | None]) -> int:
    value = values[placeholder.value]
    if value is None:
        raise ConfigError(f"TrainerPlaceholderValues.{placeholder.name} is unknown for this run (a train dataset "
                          "without a length): pass the number to create_scheduler_fn instead")
    return value


def replace_trainer_placeholder_values(trainer: Trainer, instance: Any) -> Any:
    """``instance`` (a ``functools.partial``) with every placeholder among its arguments replaced."""
    if not isinstance(instance, partial):
        return instance
    values = trainer._placeholder_values()

    def resolved(value: Any) -> Any:
        if isinstance(value, TrainerPlaceholderValues):
            return _value(value, values)
        return value.resolve(values) if isinstance(value, _Expression) else value

    return partial(instance.func, *map(resolved, instance.args),
                   **{key: resolved(value) for key, value in instance.keywords.items()})


class EpochEndPhase(Phase):
    """pytorch-accelerated's end of an epoch, after its train and eval epochs: ``training_run_epoch_end()``,
    the ``on_training_run_epoch_end`` event, then the history's epoch moves on."""

    name = "epoch_end"

    def run(self, trainer: Any) -> None:
        with trainer._stopping_on_error():
            trainer.training_run_epoch_end()
            trainer.callback_handler.call_event("on_training_run_epoch_end", trainer)
        trainer.run_history._increment_epoch()


class EventBridge(Callback):
    """Fires pytorch-accelerated's callback events from phasetrain's hooks, and keeps its run history.

    A ``StopTrainingError`` from an event ends the run at the next phase boundary (the current optimizer
    step finishes); its message is printed and ``on_stop_training_error`` fires once.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.handler = trainer.callback_handler
        self.loss_names = {"train/loss": "train_loss_epoch", "eval/loss": "eval_loss_epoch"}
        self._hooks: dict[str, list[Callable[..., Any]]] = {}

    def _fire(self, trainer: Trainer, event: str, **kwargs: Any) -> None:
        # Per batch: only the callbacks that define the event (a dict lookup when none does).
        if not self._hooks:  # evaluate() fires eval events without a run start
            self._bind()
        try:
            for hook in self._hooks[event]:
                hook(trainer, **kwargs)
        except StopTrainingError as error:  # as in pytorch-accelerated, the event's later callbacks do not run
            trainer._stop_training(error)

    def _bind(self) -> None:
        """The callbacks' own (overridden) methods per event, taken when the run starts."""
        self._hooks = {event: [getattr(cb, event) for cb in self.handler
                               if getattr(type(cb), event, None) is not getattr(TrainerCallback, event)]
                       for event in EVENTS}

    def on_run_start(self, trainer: Trainer) -> None:
        self._bind()
        self._fire(trainer, "on_training_run_start")

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_train_epoch_start")

    def on_train_step_start(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_train_step_start")

    def on_train_batch_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
        self._fire(trainer, "on_train_step_end", batch=batch, batch_output=batch_output,
                   step=trainer.state.batch_in_epoch - 1)

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_train_epoch_end")

    def on_enter_eval_epoch(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_eval_epoch_start", is_intermediate=False)

    def on_eval_step_start(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_eval_step_start")

    def on_eval_step_end(self, trainer: Trainer, batch: Any, batch_output: dict[str, Any]) -> None:
        self._fire(trainer, "on_eval_step_end", batch=batch, batch_output=batch_output)

    def on_exit_eval_epoch(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_eval_epoch_end", is_intermediate=False)

    def on_run_end(self, trainer: Trainer) -> None:
        self._fire(trainer, "on_training_run_end")

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "epoch":
            for key, name in self.loss_names.items():
                if key in record:
                    trainer.run_history.update_metric(name, record[key])

    def state_dict(self) -> dict[str, Any]:
        return self.handler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handler.load_state_dict(state)


class Trainer(CoreTrainer, replaces=("save_checkpoint",)):
    """pytorch-accelerated's Trainer: ``Trainer(model, loss_func, optimizer, callbacks, run_history)``, then
    ``train(train_dataset=..., num_epochs=..., ...)`` and ``evaluate(dataset=...)``.

    Beyond pytorch-accelerated's arguments, ``train`` takes ``run_dir`` (a phasetrain run folder: config,
    metrics.jsonl, a checkpoint every epoch, the final weights; without it the run writes nothing that
    outlives it) and ``seed`` (42, the seed pytorch-accelerated sets).
    """

    # pytorch-accelerated's eval step often updates a metric as it goes: phasetrain's dry run of the
    # loss step before training (Trainer.setup_run) would count two extra samples in the first epoch.
    check_steps_before_run = False

    def __init__(self, model: torch.nn.Module, loss_func: Any, optimizer: torch.optim.Optimizer,
                 callbacks: Iterable[TrainerCallback | type[TrainerCallback]] = DEFAULT_CALLBACKS,
                 run_history: RunHistory | None = None) -> None:
        # Nothing of the run is built until train(): pytorch-accelerated's datasets arrive there.
        self.model, self.loss_fn, self.optimizer = model, loss_func, optimizer
        self.callback_handler = CallbackHandler(callbacks)
        self._history = run_history if run_history is not None else InMemoryRunHistory()
        self.run_history: Any = self._history
        self.scheduler: Any = None
        self.create_scheduler_fn: Callable[..., Any] | None = None
        self.collate_fn: Callable[[list[Any]], Any] | None = None
        self.train_dataset: Any = None
        self.eval_dataset: Any = None
        self.run_config: TrainerRunConfig | None = None
        self.accelerator = Accelerator()  # for device and print before train(); train() makes the run's own
        self._train_dl_kwargs: dict[str, Any] = {}
        self._eval_dl_kwargs: dict[str, Any] = {}
        self._training = False
        self.callback_handler.call_event("on_init_end", self)

    # ---- pytorch-accelerated's names for phasetrain's attributes ---------------------------------------
    @property
    def loss_func(self) -> Any:
        return self.loss_fn

    @loss_func.setter
    def loss_func(self, value: Any) -> None:
        self.loss_fn = value

    @property
    def _accelerator(self) -> Accelerator:
        return self.accelerator

    @property
    def device(self) -> torch.device:
        return self._accelerator.device

    @property
    def _train_dataloader(self) -> _BatchCount | None:
        """For callbacks that ask ``len(trainer._train_dataloader)``: this process's batches per epoch."""
        return None if self.train_dataset is None else _BatchCount(self.data.batches_per_epoch)

    @property
    def _eval_dataloader(self) -> _BatchCount | None:
        """For callbacks that ask ``len(trainer._eval_dataloader)``: this process's eval batches."""
        return None if self.eval_dataset is None else _BatchCount(self.data.eval_batch_count(self.eval_dataset))

    def get_model(self, keep_torch_compile: bool = True) -> torch.nn.Module:
        """The model without its data-parallel wrapper."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=keep_torch_compile)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only."""
        self._accelerator.print(*args, **kwargs)

    def gather(self, tensor: torch.Tensor, padding_value: float | None = None) -> torch.Tensor:
        """``tensor`` from every process, concatenated; with ``padding_value``, tensors of unequal length are
        padded to gather and the padding removed after."""
        accelerator = self._accelerator
        if padding_value is None:
            return accelerator.gather(tensor)
        pad = torch.as_tensor(padding_value).to(dtype=tensor.dtype).item()
        gathered = accelerator.gather(accelerator.pad_across_processes(tensor, pad_index=pad))
        return gathered[gathered != pad] if gathered.ndim == 1 else gathered[(gathered != pad).any(dim=-1)]

    # ---- overridable, with pytorch-accelerated's defaults -------------------------------------------------
    def get_default_train_dl_kwargs(self, batch_size: int) -> dict[str, Any]:
        # pytorch-accelerated's defaults but its worker_init_fn: phasetrain seeds each worker per batch
        return {"shuffle": True, "pin_memory": torch.cuda.is_available(), "batch_size": batch_size,
                "num_workers": _default_workers()}

    def get_default_eval_dl_kwargs(self, batch_size: int) -> dict[str, Any]:
        return {"shuffle": False, "pin_memory": torch.cuda.is_available(), "batch_size": batch_size,
                "num_workers": _default_workers()}

    def create_scheduler(self) -> Any:
        """The scheduler ``create_scheduler_fn`` makes of the optimizer, its placeholders replaced."""
        if self.create_scheduler_fn is None:
            return None
        # The torch optimizer, not accelerate's wrapper: phasetrain steps the former (see accelerator.direct_steps),
        # and a scheduler counts the steps of the one it was given.
        return replace_trainer_placeholder_values(self, self.create_scheduler_fn)(self.optimizer.optimizer)

    def _scheduler_sized_by(self) -> set[str]:
        # A create_scheduler_fn sized by NUM_EPOCHS keeps that length in its saved state (see the core's check).
        function = self.create_scheduler_fn
        if not isinstance(function, partial):
            return set()
        arguments = [*function.args, *function.keywords.values()]
        placeholders = [a.placeholder if isinstance(a, _Expression) else a for a in arguments]
        return {"epochs"} if TrainerPlaceholderValues.NUM_EPOCHS in placeholders else set()

    def create_run_history(self) -> Any:
        return self._history

    def default_callbacks(self) -> list[Callback]:
        # pytorch-accelerated's own callbacks print and draw bars; phasetrain's metrics.jsonl stays.
        return [MetricsFile()]

    def training_run_epoch_end(self) -> None:
        """End of an epoch's train and eval, before ``on_training_run_epoch_end``."""

    def training_run_end(self) -> None:
        self.model = self.get_model()

    def evaluation_run_start(self) -> None:
        """Start of ``evaluate()``, before ``on_evaluation_run_start``."""

    def evaluation_run_end(self) -> None:
        self.model = self.get_model()

    # ---- train and evaluate ---------------------------------------------------------------------------
    def train(self, train_dataset: Any, num_epochs: int, eval_dataset: Any = None, per_device_batch_size: int = 8,
              max_num_train_steps: int | None = None, gradient_accumulation_steps: int = 1,
              gradient_clip_value: float | None = None, create_scheduler_fn: Callable[..., Any] | None = None,
              train_dataloader_kwargs: dict[str, Any] | None = None,
              eval_dataloader_kwargs: dict[str, Any] | None = None, reset_run_history: bool = True,
              collate_fn: Callable[[list[Any]], Any] | None = None, resume_from: str | None = None, *,
              run_dir: str | os.PathLike[str] | None = None, seed: int = 42) -> None:
        """Train on ``train_dataset`` for ``num_epochs`` (or ``max_num_train_steps`` optimizer steps),
        evaluating on ``eval_dataset`` after every epoch. ``resume_from="latest"`` (with the same
        ``run_dir``) continues an interrupted run exactly where its last checkpoint was taken."""
        for name in ("create_train_dataloader", "create_eval_dataloader"):
            if getattr(type(self), name) is not getattr(Trainer, name):
                raise ConfigError(f"{type(self).__name__} overrides {name}; phasetrain builds its loaders itself so "
                                  "that the data order is resumable: pass their settings as train_dataloader_kwargs/"
                                  "eval_dataloader_kwargs and collate_fn, or batch inside calculate_*_batch_loss")
        if resume_from is not None and run_dir is None:
            raise ConfigError(f"resume_from={resume_from!r} needs the run folder of the run to continue: pass the "
                              "run_dir= it was trained with (phasetrain checkpoints live in RUN_DIR/checkpoints)")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.create_scheduler_fn, self.collate_fn = create_scheduler_fn, collate_fn
        if resume_from is None and reset_run_history:
            self._history.reset()
        train_kwargs = self._loader_settings(self.get_default_train_dl_kwargs(per_device_batch_size),
                                             train_dataloader_kwargs, "train_dataloader_kwargs")
        eval_kwargs = self._loader_settings(self.get_default_eval_dl_kwargs(per_device_batch_size),
                                            eval_dataloader_kwargs, "eval_dataloader_kwargs")
        self._train_dl_kwargs, self._eval_dl_kwargs = train_kwargs, eval_kwargs
        keep = run_dir is not None  # a run folder to keep: checkpoints, step records, the best weights
        train = {"epochs": num_epochs, "batch_size": train_kwargs["batch_size"],
                 "eval_batch_size": eval_kwargs["batch_size"], "grad_accum_steps": gradient_accumulation_steps,
                 "max_grad_value": None if gradient_clip_value is None else float(gradient_clip_value),
                 "max_steps": max_num_train_steps, "shuffle": bool(train_kwargs["shuffle"]),
                 "drop_last": bool(train_kwargs.get("drop_last", False)), "num_workers": train_kwargs["num_workers"],
                 "log_every_steps": 50 if keep else 0,  # phasetrain's default; nobody reads a throwaway folder's
                 "sync_batchnorm": any(isinstance(cb, ConvertSyncBatchNormCallback) for cb in self.callback_handler)}
        with self._run_folder(run_dir) as folder:
            config = self._config(folder, seed, train, overwrite=not keep, checkpoint={
                "every_epochs": 1 if keep else 0, "keep_best": 1 if keep and eval_dataset is not None else 0})
            steps_per_epoch = self._steps_per_epoch(config.train) if config.train.max_steps is not None else None
            if steps_per_epoch is not None:  # pytorch-accelerated: max steps decide the number of epochs
                config.train.epochs = max(1, math.ceil(config.train.max_steps / steps_per_epoch))  # type: ignore[operator]
            self._run_training(config, gradient_clip_value, resume_from)

    def _run_training(self, config: RunConfig, clip: float | None, resume_from: str | None) -> None:
        try:
            self._build(config, self.train_dataset, self.eval_dataset)
            self.add_phase(EpochEndPhase(), after="eval_epoch" if self.eval_dataset is not None else "train_epoch")
            self.run_config = self._run_config(clip)
            self._training = True
            self.run(resume=resume_from)
        except StopTrainingError as error:  # raised by an override inside an epoch: the walk ended there
            self.print(error)
            self.callback_handler.call_event("on_stop_training_error", self)
            self.training_run_end()
            self.callback_handler.call_event("on_training_run_end", self)
        finally:
            self._training = False

    def evaluate(self, dataset: Any = None, per_device_batch_size: int = 8,
                 dataloader_kwargs: dict[str, Any] | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> dict[str, float]:
        """One evaluation pass over ``dataset`` with the eval events; its loss is ``evaluation_loss`` in the
        run history. Unlike pytorch-accelerated, the training metrics stay in the history."""
        if self._training:  # called from a callback or an override during train(): the run's trainer evaluates
            return CoreTrainer.evaluate(self, dataset if dataset is not None else self.eval_dataset)
        kwargs = self._loader_settings(self.get_default_eval_dl_kwargs(per_device_batch_size), dataloader_kwargs,
                                       "dataloader_kwargs")
        self.eval_dataset, self.collate_fn = dataset, collate_fn
        with self._run_folder(None) as folder:
            config = self._config(folder, 42, {"epochs": 1, "batch_size": kwargs["batch_size"],
                                               "num_workers": kwargs["num_workers"]},
                                  overwrite=True, checkpoint={"every_epochs": 0, "keep_best": 0})
            self._build(config, dataset, dataset)
            self.run_config = self._run_config(None)
            self.evaluation_run_start()
            self.callback_handler.call_event("on_evaluation_run_start", self)
            with self._stopping_on_error():
                self.eval_epoch_start()
                self.callback_handler.call_event("on_eval_epoch_start", self, is_intermediate=False)
                results = self._evaluate(dataset, hooks=True)
                self.eval_epoch_end()
                self._history.update_metric("evaluation_loss", results["loss"])
                self.callback_handler.call_event("on_eval_epoch_end", self, is_intermediate=False)
            self.evaluation_run_end()
            self.callback_handler.call_event("on_evaluation_run_end", self)
        return results

    def create_train_dataloader(self, batch_size: int, train_dl_kwargs: dict[str, Any] | None = None) -> Any:
        """Not an override point here: phasetrain owns the train loader (resumable data order)."""
        raise NotImplementedError("phasetrain builds the train loader itself; see Trainer.train")

    def create_eval_dataloader(self, batch_size: int, eval_dl_kwargs: dict[str, Any] | None = None) -> Any:
        """Not an override point here: phasetrain owns the eval loader (each sample once on N processes)."""
        raise NotImplementedError("phasetrain builds the eval loader itself; see Trainer.train")

    # ---- checkpoints in pytorch-accelerated's format ----------------------------------------------------------
    def save_checkpoint(self, save_path: str | os.PathLike[str] | None = None,  # type: ignore[override]
                        checkpoint_kwargs: dict[str, Any] | None = None, save_optimizer: bool = True,
                        save_scheduler: bool = True, save_per_node: bool = True,
                        phase_finished: bool = False, *, wait: bool = False) -> Any:
        """Write the model (and optimizer, scheduler) state to ``save_path``, as pytorch-accelerated does;
        written atomically, by the main process only. Without ``save_path``, phasetrain's own checkpoint of
        the whole run (``phasetrain.Trainer.save_checkpoint``), which the run takes itself with ``run_dir``."""
        if save_path is None:
            return CoreTrainer.save_checkpoint(self, phase_finished, wait=wait)
        from phasetrain.run_folder import atomic_path
        checkpoint: dict[str, Any] = {"model_state_dict": self.get_model(keep_torch_compile=False).state_dict()}
        if save_optimizer:
            checkpoint["optimizer_state_dict"] = self.optimizer.state_dict()
        if save_scheduler and self.scheduler is not None:
            checkpoint["scheduler_state_dict"] = self.scheduler.state_dict()
        checkpoint.update(checkpoint_kwargs or {})
        accelerator = self._accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process or (save_per_node and accelerator.is_local_main_process):
            with atomic_path(pathlib.Path(save_path)) as tmp:
                torch.save(checkpoint, tmp)
        accelerator.wait_for_everyone()

    def load_checkpoint(self, checkpoint_path: str | os.PathLike[str], load_optimizer: bool = True,
                        load_scheduler: bool = True) -> dict[str, Any]:
        self._accelerator.wait_for_everyone()
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        self.get_model(keep_torch_compile=False).load_state_dict(checkpoint["model_state_dict"])
        if load_optimizer and "optimizer_state_dict" in checkpoint:
            self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if load_scheduler and "scheduler_state_dict" in checkpoint:
            if self.scheduler is None:
                raise ValueError(f"{checkpoint_path} holds a scheduler state, but this trainer has no scheduler: "
                                 "pass create_scheduler_fn to train(), or load_scheduler=False")
            self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        return checkpoint

    # ---- the mapping ----------------------------------------------------------------------------------------
    def _build(self, config: RunConfig, train_dataset: Any, eval_dataset: Any) -> None:
        """phasetrain's Trainer for ``config`` over this trainer's model and optimizer (unwrapped again when a
        previous train() or evaluate() prepared them)."""
        model = self.get_model()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper of the last run
        CoreTrainer.__init__(self, config, model=model, loss_fn=self.loss_fn, optimizer=optimizer,
                             train_data=train_dataset, eval_data=eval_dataset, callbacks=[EventBridge(self)],
                             collate_fn=self.collate_fn)

    @staticmethod
    @contextlib.contextmanager
    def _run_folder(run_dir: str | os.PathLike[str] | None) -> Iterator[pathlib.Path]:
        """``run_dir``, or a throwaway folder removed afterwards: pytorch-accelerated leaves no files behind."""
        if run_dir is not None:
            yield pathlib.Path(run_dir)
            return
        scratch = tempfile.mkdtemp(prefix="phasetrain-compat-")
        try:
            yield pathlib.Path(scratch) / "run"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _config(self, folder: pathlib.Path, seed: int, train: dict[str, Any], overwrite: bool,
                checkpoint: dict[str, Any]) -> RunConfig:
        """The run's config; what both train() and evaluate() take from the callbacks and the launcher."""
        return RunConfig(run_dir=folder, seed=seed, overwrite=overwrite, checkpoint=checkpoint, train={
                             **train, "progress_bar": False, "limit_batches": self._batch_limit(),
                             # `accelerate launch --mixed_precision` says it through the environment
                             "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION", "no")})

    def _batch_limit(self) -> int | None:
        """LimitBatchesCallback's number, or pytorch-accelerated's PT_ACC_LIMIT_BATCHES."""
        return next((cb.num_batches for cb in self.callback_handler if isinstance(cb, LimitBatchesCallback)),
                    limit_batches_from_env())

    def _steps_per_epoch(self, train: TrainConfig) -> int | None:
        """Optimizer steps per epoch on this process, as the run will count them (None: a dataset without a
        length; the run then stops at num_epochs or max_num_train_steps, whichever comes first)."""
        from phasetrain.accelerator import process_state
        from phasetrain.batches import RunData
        state = process_state()
        return RunData({"train": self.train_dataset}, train, 0, process_index=state.process_index,
                       num_processes=state.num_processes).steps_per_epoch

    def _placeholder_values(self) -> dict[str, int | None]:
        length, data = self.run_length, self.data
        return {"epochs": length.epochs, "steps_per_epoch": length.steps_per_epoch,
                "per_process_steps_per_epoch": length.steps_per_epoch, "train_batches": data.batches_per_epoch,
                "eval_batches": data.eval_batch_count(data.eval) if data.eval is not None else 0,
                "batch_size": length.batch_size, "eval_batch_size": length.eval_batch_size}

    def _run_config(self, clip: float | None) -> TrainerRunConfig:
        length, accelerator = self.run_length, self._accelerator
        steps = length.steps_per_epoch or 0
        return TrainerRunConfig(
            num_epochs=length.epochs, train_per_device_batch_size=length.batch_size,
            train_dl_kwargs=self._train_dl_kwargs, eval_per_device_batch_size=length.eval_batch_size,
            eval_dl_kwargs=self._eval_dl_kwargs, gradient_accumulation_steps=length.grad_accum_steps,
            gradient_clip_value=clip, train_total_batch_size=length.batch_size * length.num_processes * length.grad_accum_steps,
            eval_total_batch_size=length.eval_batch_size * length.num_processes, num_update_steps_per_epoch=steps,
            num_local_update_steps_per_epoch=steps, max_num_train_steps=length.total_steps,
            is_local_process_zero=accelerator.is_local_main_process, is_world_process_zero=accelerator.is_main_process,
            is_distributed=length.num_processes > 1, mixed_precision=str(accelerator.mixed_precision),
            num_processes=length.num_processes)

    def _loader_settings(self, defaults: dict[str, Any], given: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """The DataLoader settings phasetrain takes over from pytorch-accelerated's kwargs; the rest named."""
        settings = {**defaults, **(given or {})}
        for key in ("sampler", "batch_sampler"):
            if settings.get(key) is not None:
                raise ConfigError(f"{what}: {key!r} is not supported; phasetrain draws each epoch's order from the "
                                  "run seed so that a run resumes exactly (shuffle=True/False chooses the order)")
        if settings.get("collate_fn") is not None:
            self.collate_fn = settings["collate_fn"]
        # pin_memory is phasetrain's choice (pinned when the device is not the CPU), so it is not named.
        ignored = sorted(set(settings) - {"batch_size", "shuffle", "num_workers", "drop_last", "pin_memory", "collate_fn"})
        if ignored:
            warnings.warn(f"{what}: {', '.join(ignored)} not used: phasetrain makes its own loader (batch_size, "
                          "shuffle, num_workers, drop_last and collate_fn are taken over; workers are seeded per "
                          "batch by phasetrain, so a worker_init_fn's seeding is not needed)", stacklevel=3)
        return settings

    @contextlib.contextmanager
    def _stopping_on_error(self) -> Iterator[None]:
        try:
            yield
        except StopTrainingError as error:
            self._stop_training(error)

    def _stop_training(self, error: StopTrainingError) -> None:
        """End the run at the next phase boundary (the current optimizer step finishes), as a
        ``StopTrainingError`` does: its message printed, ``on_stop_training_error`` fired."""
        if self.state.stop_requested:  # the run is stopping already (a NaN in several eval batches, say)
            return
        self.print(error)
        self.request_stop(str(error) or "StopTrainingError")
        self.callback_handler.call_event("on_stop_training_error", self)


class _BatchCount:
    """The length of a loader phasetrain builds itself, each epoch anew (there is no one loader object)."""

    def __init__(self, batches: int | None) -> None:
        self.batches = batches

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("the train dataset has no length, so its loader has none")
        return self.batches


def _default_workers() -> int:
    cpus = os.cpu_count() or 1
    return max(cpus // torch.cuda.device_count() if torch.cuda.is_available() else cpus, 1)

