"""Trainer: wires the config, the accelerator, the phase graph and the callbacks, then walks the graph.

Behaviour lives in small overridable steps (``calculate_train_batch_loss``, ``backward_step``,
``optimizer_step``, ...), side effects in callbacks, and the phase order in the graph.

Example::

    from phasetrain import RunConfig, Trainer
    history = Trainer(RunConfig.from_file("examples/digits.yaml")).run()
    history.get_latest_metric("eval/accuracy")
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device, set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset

from phasetrain.callbacks import Callback, CallbackList, ProgressBar, default_callbacks
from phasetrain.checkpoint import CheckpointManager
from phasetrain.components import Components, build_components
from phasetrain.conditions import Condition
from phasetrain.config import RunConfig
from phasetrain.data import EpochBatchSampler, epoch_seed, make_loader
from phasetrain.errors import ConfigError, DataError, GraphError
from phasetrain.graph import PhaseGraph, PhaseRunner
from phasetrain.history import RunHistory
from phasetrain.phases import Phase, build_phase, default_phases, unpack_batch
from phasetrain.run_folder import RunFolder
from phasetrain.state import RunState

BatchOutput = dict[str, Any]  # {"loss": Tensor, "model_outputs": Any, "batch_size": int}


class Trainer:
    """Trains ``model`` by walking the phase graph ``setup -> train_epoch -> eval_epoch -> checkpoint -> done``.

    Components come from ``config`` as import specs, or as objects given here (an object given
    overrides the config's entry). ``train_data``/``eval_data`` are map-style datasets of
    ``(inputs, targets)``; ``metrics`` maps names to torchmetrics objects, computed per eval epoch.
    """

    def __init__(self, config: RunConfig | str | os.PathLike[str] | Mapping[str, Any] | None = None, *,
                 model: torch.nn.Module | None = None, loss_fn: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 train_data: Dataset[Any] | None = None, eval_data: Dataset[Any] | None = None,
                 metrics: Mapping[str, Any] | None = None, callbacks: Iterable[Callback] | None = None) -> None:
        self.config = _as_config(config)
        train_cfg = self.config.train
        self.accelerator = _accelerator(train_cfg.mixed_precision)
        self.device = self.accelerator.device
        set_seed(self.config.seed)  # before the model is built, so its initial weights follow the seed
        parts: Components = build_components(self.config, model=model, loss_fn=loss_fn, optimizer=optimizer,
                                             train_data=train_data, eval_data=eval_data, metrics=metrics)
        self.loss_fn = parts.loss_fn
        self.train_data, self.eval_data, self.test_data = parts.train_data, parts.eval_data, parts.test_data
        self.model, self.optimizer = self.accelerator.prepare(parts.model, parts.optimizer)
        self.scheduler = parts.scheduler
        self.metrics = {name: _checked_metric(name, metric).to(self.device) for name, metric in parts.metrics.items()}

        self.state = RunState(epochs=train_cfg.epochs)
        self.run_history = RunHistory()
        self.run_folder = RunFolder(pathlib.Path(self.config.run_dir), self.accelerator.is_main_process)
        self.checkpoints = CheckpointManager(self)
        self.phases: dict[str, Phase] = default_phases()
        self.graph = PhaseGraph.default()
        for index, spec in enumerate(self.config.phases):
            self._insert_phase(*build_phase(spec, index))
        user_callbacks = parts.callbacks + list(callbacks or [])
        self.callbacks = CallbackList(self._with_callbacks(self.default_callbacks(), user_callbacks), self.graph.phases)
        self._started = False
        if self.train_batches == 0:
            raise DataError(f"train dataset has {len(self.train_data)} samples per process, fewer than "
                            f"batch_size {train_cfg.batch_size} with drop_last: no batch to train on")
        self._warn_unknown_monitor()
        self._build_machine()
        self._move_batches = self.device.type != "cpu"
        # Without a grad scaler, DeepSpeed, Megatron or XLA, AcceleratedOptimizer.step/zero_grad and
        # Accelerator.backward only forward to the optimizer and loss.backward(), after a package lookup,
        # a signature inspection and a `loss / 1` per call (~10% on a tiny MLP). Go direct then; keep
        # accelerate's path wherever it does real work.
        special = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
        self._plain_steps = self.accelerator.scaler is None and self.accelerator.distributed_type not in special
        self._step_optimizer = self.optimizer.optimizer if self._plain_steps else self.optimizer

    # ---- the graph ----------------------------------------------------------------------------
    def add_phase(self, phase: Phase, after: str = "eval_epoch", when: Condition | None = None,
                  then: str | None = None) -> None:
        """Insert ``phase`` after the phase named ``after``; it is entered when ``when`` (or the phase's own
        ``when``) holds, and the run continues to whatever followed ``after`` (or to ``then``).

        Example::

            trainer.add_phase(TestPhase(test_set, every=2), after="eval_epoch")
        """
        if self._started:
            raise GraphError(f"add_phase({phase.name!r}) after run() started: add phases before running")
        self._insert_phase(phase, after, when, then)
        self.callbacks = CallbackList(self.callbacks.callbacks, self.graph.phases)
        self._build_machine()

    def add_callback(self, callback: Callback) -> None:
        """Add a callback after construction (for example one with hooks of a phase added by ``add_phase``).

        Like a callback given to the constructor, it replaces a default callback of its class.
        """
        self.callbacks = CallbackList(self._with_callbacks(self.callbacks.callbacks, [callback]), self.graph.phases)

    def _insert_phase(self, phase: Phase, after: str, when: Condition | None, then: str | None) -> None:
        if not isinstance(phase, Phase):
            raise GraphError(f"{phase!r} is a {type(phase).__name__}: phases must subclass phasetrain.Phase")
        phase.check(self)
        self.graph.add_phase(phase.name, after, when if when is not None else phase.when, then)
        self.phases[phase.name] = phase

    def _build_machine(self) -> None:
        self._runner = PhaseRunner()
        self._machine = self.graph.build_machine(self, self._runner, self._on_enter_phase, self._on_exit_phase)

    def _warn_unknown_monitor(self) -> None:
        cfg = self.config.checkpoint
        if cfg.keep_best == 0:
            return
        names = ["loss", *self.metrics]
        known = {"train/loss", "train/lr"} | {f"{split}/{n}" for split in ("eval", "test") for n in names} | {
            f"{phase}/{n}" for phase in self.phases for n in names}
        if cfg.monitor not in known:
            warnings.warn(f"checkpoint.monitor {cfg.monitor!r} is not a metric this run logs ({', '.join(sorted(known))}); "
                          "keep_best keeps nothing unless a callback logs it", stacklevel=3)

    def render_graph(self, path: str | os.PathLike[str] | None = None, *, format: str | None = None,
                     highlight: str | None = None) -> str | bytes | pathlib.Path:
        """The phase graph as a diagram, from the graph this trainer's machine was built from.

        ``render_graph()`` / ``render_graph(format="dot")`` return Mermaid / DOT text (no system
        dependencies); ``render_graph("loop.svg")`` or ``.png`` writes an image through Graphviz's ``dot``
        and returns the path. Once the run has started, the current phase is highlighted.
        """
        from phasetrain import render
        if highlight is None and self._started:
            highlight = self.state.phase
        if path is not None:
            return render.write(self.graph, pathlib.Path(path), format, highlight)
        return render.render(self.graph, format or "mermaid", highlight)

    # ---- the walk -----------------------------------------------------------------------------
    def run(self, resume: str | os.PathLike[str] | None = None) -> RunHistory:
        """Walk the graph to ``done``; returns the run history.

        ``resume="latest"`` (or a checkpoint folder) restores the saved run exactly and continues from
        the saved phase; a mid-epoch checkpoint skips the consumed batches without loading them.
        """
        if resume is not None:
            if self.run_folder.final_weights.exists():
                _say(f"run {self.run_dir} is finished ({self.run_folder.final_weights.name} written); nothing to resume")
                return self.run_history
            if str(resume) == "latest" and not self.checkpoints.all():
                warnings.warn(f"no checkpoint in {self.run_folder.checkpoints} yet: starting the run from the "
                              "beginning", stacklevel=2)
                self.run_folder.restarting = True
            else:
                self.checkpoints.load(self.checkpoints.find(resume))
        self.checkpoints.install_signal_handlers()
        try:
            self._walk()
        finally:
            self.checkpoints.restore_signal_handlers()
        return self.run_history

    def _walk(self) -> None:
        self._started = True
        self.callbacks.fire("on_run_start", self)
        if self.state.phase == "setup" and not self.state.phase_complete:
            self._on_enter_phase("setup")  # the machine's initial state fires no enter
        while True:
            if not self.state.phase_complete:
                self.phases[self.state.phase].run(self)
                self.state.phase_complete = True
            if self.state.phase == "done":
                break
            if self.checkpoints.signal_pending():
                self.checkpoints.stop_for_signal()
            if not self._runner.advance():
                raise GraphError(f"no edge out of phase {self.state.phase!r} could be taken")
        self.callbacks.fire("on_run_end", self)

    def set_phase(self, phase: str) -> None:
        """Put the machine in ``phase`` without firing enter/exit callbacks (used by resume)."""
        if phase not in self.graph.phases:
            raise GraphError(f"phase {phase!r} is not in this run's graph; phases: {', '.join(self.graph.phases)} "
                             "(add the same custom phases before resuming)")
        self._machine.set_state(phase)
        self.state.phase = phase

    def _on_enter_phase(self, phase: str) -> None:
        state = self.state
        state.phase, state.phase_complete = phase, False
        if phase == "train_epoch":
            state.epoch += 1
            state.batch_in_epoch = state.micro_step = state.train_samples = state.logged_samples = 0
            state.train_loss_sum = state.logged_loss_sum = 0.0
            state.epoch_start_step = state.optimizer_step
        self.callbacks.fire(f"on_enter_{phase}", self)

    def _on_exit_phase(self, phase: str) -> None:
        self.callbacks.fire(f"on_exit_{phase}", self)

    def request_stop(self, reason: str) -> None:
        """End the run at the next phase boundary (a train epoch stops after the current optimizer step)."""
        self.state.request_stop(reason)

    @property
    def phase(self) -> str:
        return self._runner.phase

    @property
    def run_dir(self) -> pathlib.Path:
        return self.run_folder.path

    def default_callbacks(self) -> list[Callback]:
        """Callbacks every run gets; a user callback of the same class replaces the default one."""
        callbacks = default_callbacks()
        if not self.config.train.progress_bar:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
        return callbacks

    def _with_callbacks(self, current: list[Callback], added: list[Callback]) -> list[Callback]:
        """``current`` then ``added``; an added callback of a default's class (or a subclass) replaces that default."""
        default_types = {type(cb) for cb in self.default_callbacks()}
        kept = [cb for cb in current
                if not (type(cb) in default_types and any(isinstance(new, type(cb)) for new in added))]
        return kept + added

    # ---- data ---------------------------------------------------------------------------------
    def train_loader(self, skip_batches: int = 0) -> Iterable[Any]:
        """This process's batches of the current epoch, skipping the first ``skip_batches`` without loading them."""
        cfg = self.config.train
        if isinstance(self.train_data, IterableDataset):
            loader = DataLoader(self.train_data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
            if skip_batches:
                warnings.warn("resume is not exact: the train dataset is an IterableDataset, whose order "
                              f"phasetrain does not own; skipping {skip_batches} batches by loading them", stacklevel=2)
                return itertools.islice(loader, skip_batches, None)
            return loader
        sampler = self._sampler(self.train_data, cfg.batch_size, shuffle=cfg.shuffle, drop_last=cfg.drop_last,
                                pad=True, skip=skip_batches)
        return make_loader(self.train_data, sampler, num_workers=cfg.num_workers, pin_memory=self._move_batches,
                           seed=epoch_seed(self.config.seed, self.state.epoch))

    def eval_loader(self, dataset: Dataset[Any]) -> Iterable[Any]:
        """Batches of ``dataset`` in order, sharded across processes without duplicates."""
        cfg = self.config.train
        if isinstance(dataset, IterableDataset):
            return DataLoader(dataset, batch_size=cfg.resolved_eval_batch_size, num_workers=cfg.num_workers)
        sampler = self._sampler(dataset, cfg.resolved_eval_batch_size, shuffle=False, drop_last=False, pad=False)
        return make_loader(dataset, sampler, num_workers=cfg.num_workers, pin_memory=self._move_batches,
                           seed=self.config.seed)

    def _sampler(self, dataset: Any, batch_size: int, *, shuffle: bool, drop_last: bool, pad: bool,
                 skip: int = 0) -> EpochBatchSampler:
        return EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last,
                                 seed=self.config.seed, epoch=self.state.epoch, pad=pad, skip=skip,
                                 rank=self.accelerator.process_index, world_size=self.accelerator.num_processes)

    @property
    def train_batches(self) -> int | None:
        """Micro-batches per train epoch on this process (None for an iterable dataset without a length)."""
        cfg = self.config.train
        if isinstance(self.train_data, IterableDataset):
            return _len_or_none(self.train_data, cfg.batch_size)
        return self._sampler(self.train_data, cfg.batch_size, shuffle=False, drop_last=cfg.drop_last,
                             pad=True).batches_per_epoch

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per train epoch (the last accumulation group may be short); None if unknown."""
        batches = self.train_batches
        return None if batches is None else -(-batches // self.config.train.grad_accum_steps)

    @property
    def eval_batches(self) -> int | None:
        """Batches per eval epoch on this process (None for an iterable dataset without a length)."""
        batch_size = self.config.train.resolved_eval_batch_size
        if self.eval_data is None or isinstance(self.eval_data, IterableDataset):
            return None if self.eval_data is None else _len_or_none(self.eval_data, batch_size)
        return len(self._sampler(self.eval_data, batch_size, shuffle=False, drop_last=False, pad=False))

    def to_device(self, batch: Any) -> Any:
        return send_to_device(batch, self.device, non_blocking=True) if self._move_batches else batch

    # ---- overridable steps ----------------------------------------------------------------------
    def calculate_train_batch_loss(self, batch: Any) -> BatchOutput:
        """Forward one training batch ``(inputs, targets)``; return loss, model outputs and batch size."""
        inputs, targets = unpack_batch(batch)
        outputs = self.model(inputs)
        return {"loss": self.loss_fn(outputs, targets), "model_outputs": outputs, "batch_size": len(inputs)}

    def calculate_eval_batch_loss(self, batch: Any) -> BatchOutput:
        """Forward one eval batch (already under ``torch.no_grad``); same return as the train step."""
        return self.calculate_train_batch_loss(batch)

    def backward_step(self, loss: torch.Tensor) -> None:
        if self._plain_steps:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # scales the loss for fp16, routes DeepSpeed/Megatron

    def clip_gradients(self) -> None:
        if self.config.train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.train.max_grad_norm)

    def optimizer_step(self) -> None:
        self._step_optimizer.step()

    def optimizer_zero_grad(self) -> None:
        self._step_optimizer.zero_grad(set_to_none=True)

    def scheduler_step(self, interval: str) -> None:
        """Step the LR scheduler if it runs at this ``interval`` (``"step"`` or ``"epoch"``)."""
        spec = self.config.scheduler
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # steps on metrics
        if self.scheduler is not None and spec is not None and spec.interval == interval and not plateau:
            self.scheduler.step()

    def scheduler_step_on_metrics(self, record: Mapping[str, float]) -> None:
        """ReduceLROnPlateau steps on ``checkpoint.monitor`` whenever an epoch record carries it."""
        monitor = self.config.checkpoint.monitor
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and monitor in record:
            self.scheduler.step(record[monitor])

    def update_metrics(self, batch: Any, batch_output: BatchOutput) -> None:
        _, targets = unpack_batch(batch)
        for metric in self.metrics.values():
            metric.update(batch_output["model_outputs"], targets)

    def predict_step(self, batch: Any) -> Any:
        inputs, _ = unpack_batch(batch)
        return self.model(inputs)

    def after_optimizer_step(self) -> None:
        """Runs after each optimizer step (and its callbacks): mid-epoch checkpoints and signal stops."""
        self.checkpoints.after_optimizer_step()

    # ---- evaluation, prediction, logging ------------------------------------------------------
    def evaluate_dataset(self, dataset: Dataset[Any], progress: bool = False) -> dict[str, float]:
        """Mean loss and every metric over ``dataset``, exact across processes (no padded duplicates)."""
        with eval_mode(self.model):
            return self._evaluate(dataset, progress)

    def _evaluate(self, dataset: Dataset[Any], progress: bool) -> dict[str, float]:
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        samples = torch.zeros((), device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for batch in self.eval_loader(dataset):
                if progress:
                    self.callbacks.fire("on_eval_step_start", self)
                batch = self.to_device(batch)
                output = self.calculate_eval_batch_loss(batch)
                loss_sum += output["loss"].detach().double() * output["batch_size"]
                samples += output["batch_size"]
                self.update_metrics(batch, output)
                if progress:
                    self.callbacks.fire("on_eval_step_end", self, output)
        totals = self.accelerator.reduce(torch.stack([loss_sum, samples]), reduction="sum")
        results = {"loss": (totals[0] / totals[1]).item()}
        for name, metric in self.metrics.items():
            results[name] = float(metric.compute())  # torchmetrics syncs its state across processes here
            metric.reset()
        return results

    def evaluate(self, dataset: Dataset[Any]) -> dict[str, float]:
        """Loss and metrics of the model on ``dataset``: ``{"loss": ..., "accuracy": ...}``."""
        return self.evaluate_dataset(self._checked(dataset, "evaluate(dataset)"))

    def predict(self, dataset: Dataset[Any]) -> Any:
        """Model outputs for every sample of ``dataset`` in dataset order, gathered across processes."""
        dataset = self._checked(dataset, "predict(dataset)")
        outputs: list[Any] = []
        with eval_mode(self.model), torch.no_grad():
            for batch in self.eval_loader(dataset):
                outputs.append(send_to_device(self.predict_step(self.to_device(batch)), "cpu"))
        local = torch.cat(outputs) if outputs and isinstance(outputs[0], torch.Tensor) else outputs
        if self.accelerator.num_processes == 1:
            return local
        return _gather_in_order(local, len(dataset), self.accelerator.num_processes)  # type: ignore[arg-type]

    def _checked(self, dataset: Any, what: str) -> Any:
        from phasetrain.data import check_dataset
        check_dataset(dataset, what)
        return dataset

    def log(self, metrics: Mapping[str, float], kind: str = "epoch") -> None:
        """Send a record (``phase``, ``epoch``, ``step``, ``kind`` and ``metrics``) to every ``on_log`` hook."""
        record = {"phase": self.state.phase, "epoch": self.state.epoch, "step": self.state.optimizer_step,
                  "kind": kind, **metrics}
        if kind == "epoch" and self.config.checkpoint.monitor in metrics:
            self.state.monitor_at = (self.state.epoch, self.state.optimizer_step)
            self.scheduler_step_on_metrics(metrics)
        self.callbacks.fire("on_log", self, record)

    def monitor_is_fresh(self) -> bool:
        """Whether ``checkpoint.monitor`` was measured on the weights as they are now (no step since)."""
        return self.state.monitor_at == (self.state.epoch, self.state.optimizer_step)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def reduce_mean(self, total: torch.Tensor, samples: int) -> float:
        """Mean of a per-process sum over all processes' samples (one sync)."""
        both = torch.stack([total.double(), torch.tensor(float(samples), device=total.device, dtype=torch.float64)])
        both = self.accelerator.reduce(both, reduction="sum")
        return (both[0] / both[1].clamp(min=1)).item()

    # ---- checks before training -----------------------------------------------------------------
    def check_model_fits_loss(self) -> None:
        """Run two train samples through model and loss before training (see ``phasetrain.checks``)."""
        from phasetrain.checks import check_model_fits_loss
        check_model_fits_loss(self)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> pathlib.Path:
        """Write a checkpoint of the whole run now (model, optimizer, RNG, counters, callbacks)."""
        return self.checkpoints.save()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a block, then back to the mode the model was in (a callback may evaluate mid-epoch)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_config(config: object) -> RunConfig:
    """A RunConfig from a RunConfig, a config file path, a dict, or None (all defaults)."""
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str | os.PathLike):
        return RunConfig.from_file(pathlib.Path(config))
    if isinstance(config, Mapping):
        return RunConfig.from_dict(dict(config))
    raise ConfigError(f"Trainer(config): expected a RunConfig, a config file path or a dict, "
                      f"got {type(config).__name__}")


def _accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator with this run's precision, also when an earlier trainer in this process used another.

    accelerate keeps one process-wide state and refuses a second precision. In a single process nothing
    else depends on that state, so it is reset; in a distributed run the launch decides and it is kept.
    """
    from accelerate.state import AcceleratorState, PartialState
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision: 'fp16' needs a GPU (on the CPU it would silently do nothing); "
                          "use 'bf16' or 'no'")
    return accelerator


def _gather_in_order(local: torch.Tensor, size: int, world_size: int) -> torch.Tensor:
    # Eval shards are rank::world_size, so rank r holds samples r, r+W, r+2W, ...: interleave back.
    import torch.distributed as dist
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, local)
    result = torch.empty((size, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        result[rank::world_size] = part
    return result


def _checked_metric(name: str, metric: Any) -> Any:
    missing = [m for m in ("update", "compute", "reset", "to") if not callable(getattr(metric, m, None))]
    if missing:
        raise ConfigError(f"metrics.{name}: a {type(metric).__name__} has no {', '.join(missing)}; expected a "
                          "torchmetrics.Metric (e.g. torchmetrics.classification:MulticlassAccuracy)")
    return metric


def _len_or_none(dataset: Any, batch_size: int) -> int | None:
    try:
        return -(-len(dataset) // batch_size)
    except TypeError:
        return None


def _say(text: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(text)


