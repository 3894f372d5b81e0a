"""Trainer: the small core of a run, in pytorch-accelerated's shape.

Reading order: ``run()`` walks the phase graph (the machine, not the trainer, picks each next phase);
the built-in phases are thin nodes that call ``setup_run()``, ``train_epoch()``, ``eval_epoch()``,
``save_checkpoint()`` and ``finish_run()``; the epochs call the per-batch steps. The override points
(the steps, the epoch start/end points, ``train_epoch``/``eval_epoch``) are a few lines each, most in
``steps.py``. The methods in ``NOT_OVERRIDABLE`` do the run's bookkeeping, and a subclass that
overrides one of those gets a TypeError saying what to do instead.

Example::

    from phasetrain import RunConfig, Trainer
    history = Trainer(RunConfig.from_file("examples/digits.yaml")).run()
    history.get_latest_metric("eval/accuracy")
"""
from __future__ import annotations

import inspect
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset, IterableDataset

from phasetrain.accelerator import bare_model, direct_steps, make_accelerator, release_at_exit
from phasetrain.batches import RunData
from phasetrain.bookkeeping import MonitorValue, bookkeeping_callbacks, scheduler_stepping, warn_if_never_logged
from phasetrain.callbacks import Callback, CallbackList, say, with_callbacks
from phasetrain.checkpoint import Checkpoints
from phasetrain.checks import check_loss_step, check_model_fits_loss
from phasetrain.components import as_config, build_components
from phasetrain.conditions import Condition
from phasetrain.config import RunConfig
from phasetrain.errors import CheckpointError, ConfigError, GraphError, NonFiniteLossError
from phasetrain.graph import EPOCH, LAST, Edge, build_graph
from phasetrain.history import RunHistory
from phasetrain.losses import TrainLoss
from phasetrain.machine import PhaseMachine
from phasetrain.phases import Phase, prefixed
from phasetrain.resume_changes import apply_changes, refuse_changes, refuse_other_process_count, with_defaults
from phasetrain.rng import ProcessRNG
from phasetrain.run_folder import RunFolder
from phasetrain.signals import RunInterrupted, StopSignals
from phasetrain.state import RunState
from phasetrain.steps import TrainerSteps
from phasetrain.timing import PhaseClock, Throughput
from phasetrain.tracking import TrackerLog, tracker_names

#: Methods that do the run's bookkeeping, and what to override or use instead.
NOT_OVERRIDABLE = {
    "run": "override training_run_start/training_run_end or add a callback",
    "log": "add a callback with on_log to act on records",
    "end_optimizer_step": "override optimizer_step or add a callback with on_train_step_end",
    "save_checkpoint": "add a callback or a phase that calls it",
    "wait_for_checkpoints": "call it where you need the checkpoint on disk",
    "setup_run": "override training_run_start, or replace the setup phase",
    "finish_run": "override training_run_end, or replace the done phase",
}


class Trainer(TrainerSteps):
    """Trains ``model`` by walking the phase graph ``setup -> train_epoch -> eval_epoch -> checkpoint -> done``.

    Components come from ``config`` as import specs, or as objects given here (an object given
    overrides the config's entry). ``train_data``/``eval_data`` are map-style datasets of
    ``(inputs, targets)``; ``metrics`` maps names to torchmetrics objects, computed per evaluation;
    ``collate_fn`` makes a batch of a list of samples.
    """

    #: Run an overridden loss step on two samples before the run claims its folder (``setup_run``). A
    #: subclass whose eval step has side effects (a metric updated inside it) sets this to False.
    check_steps_before_run = True

    def __init__(self, config: RunConfig | str | os.PathLike[str] | Mapping[str, Any] | None = None, *,
                 model: torch.nn.Module | None = None, loss_fn: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 train_data: Dataset[Any] | None = None, eval_data: Dataset[Any] | None = None,
                 metrics: Mapping[str, Any] | None = None, callbacks: Iterable[Callback] | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.config = cfg = as_config(config)
        given = {"model": model, "loss_fn": loss_fn, "optimizer": optimizer, "train_data": train_data,
                 "eval_data": eval_data, "metrics": metrics, "collate_fn": collate_fn}
        self._objects = sorted(name for name, obj in given.items() if obj is not None)  # what config.yaml lacks
        trackers = tracker_names(cfg.tracking, cfg.train.fast_dev_run)
        self.accelerator = accelerator = make_accelerator(cfg.train.mixed_precision, trackers,
                                                          RunFolder(pathlib.Path(cfg.run_dir)).tracking)
        set_seed(cfg.seed)  # before the model is built, so its initial weights follow the seed
        parts = build_components(cfg, model=model, loss_fn=loss_fn, optimizer=optimizer, train_data=train_data,
                                 eval_data=eval_data, metrics=metrics)
        if cfg.train.sync_batchnorm and accelerator.num_processes > 1:  # before DDP wraps the model
            if accelerator.device.type == "cpu":  # DDP would refuse it inside prepare(), less clearly
                raise ConfigError("train.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only, and these "
                                  f"{accelerator.num_processes} processes run on the CPU; set train.sync_batchnorm=false")
            parts.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(parts.model)
        self.model, self.optimizer = accelerator.prepare(parts.model, parts.optimizer)
        if cfg.train.compile:  # around the prepared model, as accelerate's dynamo plugin does; saving unwraps it
            self.model = cast(torch.nn.Module, torch.compile(self.model, mode=cfg.train.compile_mode))
        self.loss_fn = parts.loss_fn
        self.metrics = {name: metric.to(accelerator.device) for name, metric in parts.metrics.items()}
        self.data = RunData(parts.datasets, cfg.train, cfg.seed, process_index=accelerator.process_index,
                            num_processes=accelerator.num_processes, device=accelerator.device, collate_fn=collate_fn)
        self.state = RunState(epochs=cfg.train.resolved_epochs, max_steps=cfg.train.max_steps)
        self.run_length = self.data.run_length(self.state.epochs, self.state.max_steps)
        self.scheduler = self.create_scheduler()
        self.run_history = self.create_run_history()
        self._scratch: Any = None
        self.run_folder = RunFolder(self._run_dir(cfg), accelerator.is_main_process)
        self.machine = PhaseMachine(build_graph(cfg, has_eval_data=self.data.eval is not None))
        for phase in self.machine.graph.phases.values():
            phase.check(self)
        self._monitor = MonitorValue(cfg.checkpoint.monitor)
        self._scheduler_stepping = scheduler_stepping(self.scheduler, self.config.scheduler)
        self._bookkeeping = bookkeeping_callbacks(self._monitor, self.scheduler, self._scheduler_stepping)
        self._bookkeeping.append(TrackerLog(accelerator, trackers, cfg.tracking, self.run_folder.tracking,
                                            self.run_folder.path.name, cfg.to_dict()))
        defaults = self.default_callbacks()
        self.callbacks = self._callback_list(with_callbacks(defaults, parts.callbacks + list(callbacks or []), defaults))
        if cfg.checkpoint.keep_best:
            records = [phase.records for phase in self.machine.graph.phases.values()]
            records += [prefix for callback in self.callbacks for prefix in getattr(callback, "records", ())]
            warn_if_never_logged(cfg.checkpoint.monitor, records, self.metrics)
        self._checkpoints = Checkpoints(self.run_folder.checkpoints, cfg.checkpoint, accelerator,
                                        self.run_folder.best_weights)
        self._signals = StopSignals(accelerator)
        self._train_loss = TrainLoss(accelerator.device)
        self._phase_clock = PhaseClock()
        self._epoch_rate, self._step_rate = Throughput(accelerator.num_processes), Throughput(accelerator.num_processes)
        self._direct = direct_steps(accelerator)
        self._step_optimizer = self.optimizer.optimizer if self._direct else self.optimizer
        self._started = False
        self._agreed_before_step = -1  # the optimizer step whose stop agreement came with its loss check
        if accelerator.num_processes > 1:
            release_at_exit(self)

    def __init_subclass__(cls, replaces: tuple[str, ...] = (), **kwargs: Any) -> None:
        # `replaces`: bookkeeping methods a layer such as phasetrain.compat extends with another signature; its
        # version must still do the bookkeeping when called as this one is (phasetrain.compat's save_checkpoint
        # does, without a save_path).
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("scheduler_step")
        if step is not None and len(inspect.signature(step).parameters) > 1:
            raise TypeError(f"{cls.__name__}.scheduler_step takes an argument, but since phasetrain 0.3 it is called "
                            "with none, after every optimizer step; a scheduler with interval: epoch is stepped by "
                            "the trainer after the epoch record")
        for name, instead in NOT_OVERRIDABLE.items():
            if name in cls.__dict__ and name not in replaces:
                raise TypeError(f"{cls.__name__} overrides Trainer.{name}, which does the run's bookkeeping and is "
                                f"not an override point: {instead}")

    # ---- the graph: change it before run() ------------------------------------------------------
    def add_phase(self, phase: Phase, after: str = "eval_epoch", when: Condition | None = None,
                  then: str | None = None) -> None:
        """Insert ``phase`` after the phase named ``after``; it is entered when ``when`` (or the phase's own
        ``when``) holds, and the run continues to whatever followed ``after`` (or to ``then``).

        Example::

            trainer.add_phase(TestPhase(test_set, every=2), after="eval_epoch")
        """
        self._change_graph(phase, lambda graph: graph.add_phase(phase, after, when, then))

    def replace_phase(self, phase: Phase) -> None:
        """Put ``phase`` in place of the phase of the same name, built-in or not; its edges stay."""
        self._change_graph(phase, lambda graph: graph.replace_phase(phase))

    def add_callback(self, callback: Callback) -> None:
        """Add a callback after construction (for example one with hooks of a phase added by ``add_phase``).

        Like a callback given to the constructor, it replaces a default callback of its class.
        """
        self.callbacks = self._callback_list(with_callbacks(self._user_callbacks(), [callback], self.default_callbacks()))

    def render_graph(self, path: str | os.PathLike[str] | None = None, *, format: str | None = None,
                     highlight: str | None = None) -> str | bytes | pathlib.Path:
        """The phase graph as a diagram: ``render_graph()`` / ``render_graph(format="dot")`` return Mermaid /
        DOT text; ``render_graph("loop.svg")`` or ``.png`` writes an image through Graphviz's ``dot`` and
        returns the path. Once the run has started, the current phase is highlighted."""
        from phasetrain.render import draw
        return draw(self.machine.graph, path, format, highlight or (self.state.phase if self._started else None))

    def _change_graph(self, phase: Phase, change: Any) -> None:
        if self._started:
            raise GraphError(f"phase {phase.name!r} changed after run() started: change phases before running")
        if not isinstance(phase, Phase):
            raise GraphError(f"{phase!r} is a {type(phase).__name__}: phases must subclass phasetrain.Phase")
        phase.check(self)
        change(self.machine.graph)
        self.machine = PhaseMachine(self.machine.graph)
        self.callbacks = self._callback_list(self._user_callbacks())

    def _run_dir(self, cfg: RunConfig) -> pathlib.Path:
        if not cfg.train.fast_dev_run:
            return pathlib.Path(cfg.run_dir)
        # One batch of each phase, written to a throwaway folder: the real run_dir is left as it is. The main
        # process makes it (and removes it when run() ends); every process writes its part of a checkpoint there.
        import tempfile

        from accelerate.utils import broadcast_object_list
        if self.accelerator.is_main_process:
            self._scratch = tempfile.TemporaryDirectory(prefix="phasetrain-fast-dev-run-")
        folder = [self._scratch.name if self._scratch is not None else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(folder, from_process=0)
        return pathlib.Path(str(folder[0])) / "run"

    def _scheduler_sized_by(self) -> set[str]:
        """The run-length placeholders (``epochs``, ``total_steps``) the scheduler was built with: a resume
        that changes them would leave the restored schedule at its old length."""
        from phasetrain.schedulers import LENGTH_PLACEHOLDERS, placeholders_in
        spec = self.config.scheduler
        return placeholders_in(spec.args) & set(LENGTH_PLACEHOLDERS) if spec is not None else set()

    def _callback_list(self, callbacks: list[Callback]) -> CallbackList:
        # The trainer's own callbacks come after the user's, whatever the user's list holds.
        return CallbackList([*callbacks, *self._bookkeeping], self.machine.graph.names)

    def _user_callbacks(self) -> list[Callback]:
        return [cb for cb in self.callbacks if cb not in self._bookkeeping]

    # ---- the run ------------------------------------------------------------------------------------
    def run(self, resume: str | os.PathLike[str] | None = None, *, from_other_run: bool = False) -> RunHistory:
        """Walk the graph to ``done``; returns the run history.

        ``resume="latest"`` (or a checkpoint folder or name) restores the saved run exactly and continues
        in the saved phase; a mid-epoch checkpoint skips the consumed batches without loading them.
        A checkpoint of another run folder is refused unless ``from_other_run``. Config changes since the
        checkpoint are applied where the saved state allows it (named in a warning), refused otherwise.
        """
        if resume is not None and self.run_folder.finished:  # answered without touching the folder
            from safetensors.torch import load_model
            load_model(bare_model(self.accelerator, self.model), str(self.run_folder.final_weights))
            say(f"run {self.run_folder.path} is finished: its final weights ({self.run_folder.final_weights.name}) "
                "are loaded into the model; nothing to resume")
            return self.run_history
        try:
            with self.run_folder.locked():  # one process per run folder, for the whole run
                if resume is None:
                    self.run_folder.refuse_if_occupied(self.config)  # before the dry run, not after it
                else:
                    self._resume(resume, from_other_run)
                with self._signals.installed():
                    self._walk()
        finally:
            if self._scratch is not None:  # train.fast_dev_run: its throwaway folder goes with the run
                self._scratch.cleanup()
        return self.run_history

    def _resume(self, which: str | os.PathLike[str], from_other_run: bool) -> None:
        """Load the checkpoint to continue from, and apply the config changes it allows."""
        folder = self.run_folder
        if str(which) == "latest" and not self._checkpoints.all():
            warnings.warn(f"no checkpoint in {folder.checkpoints} yet: starting the run from the beginning",
                          stacklevel=3)
            folder.restarting = True
            return
        current, saved_config, saved_processes = self.config.to_dict(), {}, []

        def refuse(path: pathlib.Path, saved: dict[str, Any]) -> None:  # before anything is loaded
            saved_config.update(with_defaults(saved["config"]))
            saved_processes.append(saved["processes"])
            refuse_changes(saved_config, current, path.name, int(saved["state"]["epoch"]),
                           int(saved["state"]["optimizer_step"]), self._scheduler_sized_by())
            refuse_other_process_count(path.name, saved["processes"], self.accelerator.num_processes,
                                       self.config.scheduler.args if self.config.scheduler is not None else None)
            missing = [name for name in saved.get("objects", []) if name not in self._objects]
            if missing:  # the config would build something else in their place: another run, silently
                raise ConfigError(f"checkpoint {path.name} was made with {', '.join(missing)} given as Python "
                                  "objects, which config.yaml does not hold; resume from Python with the same "
                                  f"objects: Trainer(config, {missing[0]}=...).run(resume='latest')")

        path, self.state = self._checkpoints.resume(which, self.config, self._to_save(), self._per_process(),
                                                    from_other_run=from_other_run, check=refuse)
        if saved_processes[0] != self.accelerator.num_processes:
            self._reshard(saved_processes[0])
        changes = apply_changes(saved_config, current, self.optimizer.optimizer)
        if changes:
            warnings.warn(changes, stacklevel=3)
            folder.write_recipe(self.config, self._graph_description())  # what the run now runs with
        if self.accelerator.is_main_process:
            say(f"resuming {folder.path} from {path.name}: epoch {self.state.epoch}, step "
                f"{self.state.optimizer_step}, in {self.state.phase}")

    def _reshard(self, saved_processes: int) -> None:
        """Continue an epoch that ``saved_processes`` processes were in the middle of: the samples of its order
        they had not consumed yet are shared out over this run's processes."""
        state = self.state
        if isinstance(self.data.train, IterableDataset):  # its own order: consumed batches are skipped by loading
            return
        if state.phase == EPOCH and not state.phase_complete and state.batch_in_epoch:
            state.epoch_start_sample = self.data.consumed_samples(state.epoch_start_sample, state.batch_in_epoch,
                                                                  saved_processes)
            state.batch_in_epoch = 0

    def _walk(self) -> None:
        self.callbacks.check()  # the graph is final now: every phase hook must name one of its phases
        self._started = True
        walker = self.machine.walker(self.state, self._entered, self._exited)
        try:
            self.training_run_start()
            self.callbacks.fire("on_run_start", self)
            walker.start()  # a resumed run re-enters its phase: its enter and exit hooks pair up
            while True:
                if not self.state.phase_complete:
                    self.machine.graph.phases[self.state.phase].run(self)
                    self.state.phase_complete = True
                if self.state.phase == LAST:  # final: entered, never exited
                    self._log_visit()
                    break
                self._signals.agree(self.state)
                if self._signals.signal_pending:
                    self._stop_for_signal()
                walker.next_phase()
            self.training_run_end()
            self.callbacks.fire("on_run_end", self)
        except BaseException as exc:  # a stop signal's RunInterrupted too: bars close, the line stands alone
            self.callbacks.fire("on_exception", self, exc)
            self._finish_pending_write()
            raise
        finally:
            self.machine.release(walker)
        self.wait_for_checkpoints()  # run() returns with every checkpoint taken on disk, one saved at run end too

    def _finish_pending_write(self) -> None:
        """A run that fails still completes the checkpoint it was writing, while it holds the run folder; should
        that write fail too, the run's own error is the one raised, and this one a warning."""
        try:
            self.wait_for_checkpoints()
        except CheckpointError as write_error:
            warnings.warn(str(write_error), stacklevel=3)

    def _entered(self, phase: str, edge: Edge | None) -> None:
        self._phase_clock.enter()
        if phase == EPOCH:  # throughput spans start here, whoever's train_epoch runs
            self._epoch_rate.start(self._train_loss.trained, self.state.optimizer_step)
            self._step_rate.start(self._train_loss.trained, self.state.optimizer_step)
        self.callbacks.fire(f"on_enter_{phase}", self)

    def _exited(self, phase: str) -> None:
        self.callbacks.fire(f"on_exit_{phase}", self)
        self._log_visit()
        self._checkpoints.raise_if_failed()  # a failed background write stops the run within a phase
        # A stop requested by an exit hook on one process decides this very move on all of them (a signal that
        # came in meanwhile waits for the check after the next phase).
        self._signals.agree(self.state)

    def request_stop(self, reason: str) -> None:
        """End the run at the next phase boundary (a train epoch stops after the current optimizer step).
        With several processes, a stop one of them requests ends every one of them there."""
        self.state.request_stop(reason)

    def log(self, metrics: Mapping[str, float], kind: str = "epoch", *, time: Mapping[str, float] | None = None) -> None:
        """Send a record (``phase``, ``epoch``, ``step``, ``kind`` and ``metrics``) to every ``on_log`` hook.

        ``time`` (seconds, rates: see ``phasetrain.timing``) goes in the record's ``"time"`` entry, apart from
        the metrics, which a resumed run reproduces bitwise while times differ on every run."""
        state = self.state
        record = {"phase": state.phase, "epoch": state.epoch, "step": state.optimizer_step, "kind": kind, **metrics}
        if time is not None:
            record["time"] = dict(time)
        self.callbacks.fire("on_log", self, record)

    def _log_visit(self) -> None:
        """The phase visit that is ending, as a ``kind: "phase"`` record: its start and seconds."""
        self.log({}, kind="phase", time=self._phase_clock.visit())

    def _rate(self, span: Throughput) -> dict[str, float]:
        """Throughput since ``span`` started; called just after a record's loss was read (the device is in sync)."""
        return span.read(self._train_loss.trained, self.state.optimizer_step)

    def save_checkpoint(self, phase_finished: bool = False, *, wait: bool = False) -> pathlib.Path:
        """Checkpoint the whole run now (at an optimizer-step boundary); returns the checkpoint's folder.

        Returns once the state is copied: the folder is written in the background and appears when it is
        complete (``checkpoint.background``); ``wait=True`` returns with it on disk. A resume from it runs the
        current phase again from its start, unless ``phase_finished``: a phase that saves as its last act says
        so, and a resume goes on to the next phase instead.
        """
        if phase_finished:
            self.state.phase_complete = True
        return self._checkpoints.save(self.state, self._to_save(), self._per_process(),
                                      {"config": self.config.to_dict(), "monitor": self._monitor.value_now(self.state),
                                       "objects": self._objects}, wait=wait)

    def wait_for_checkpoints(self) -> None:
        """Block until the checkpoint being written in the background is on disk; raises its error if the write
        failed. The run waits by itself before the next checkpoint, the final weights and a signal stop."""
        self._checkpoints.wait()

    def _to_save(self) -> dict[str, Any]:
        # Largest first (AdamW's state is twice the model): each file's fsync overlaps writing the next.
        return {"optimizer": self.optimizer.optimizer, "model": bare_model(self.accelerator, self.model),
                "scheduler": self.scheduler, "scaler": self.accelerator.scaler, "callbacks": self.callbacks,
                "phases": self.machine.graph, "history": self.run_history}

    def _per_process(self) -> dict[str, Any]:
        return {"rng": ProcessRNG(), "train_loss": self._train_loss}

    def _stop_for_signal(self) -> None:
        path = None if self.config.train.fast_dev_run else self.save_checkpoint(wait=True)
        raise RunInterrupted(self._signals.received_signal, path, self.run_folder.path, bool(self._objects),
                             self.accelerator.num_processes)

    # ---- what the built-in phases call ---------------------------------------------------------------
    def setup_run(self) -> None:
        """Run two train samples through the model and the loss (the overridden loss step, if any), then
        claim the run folder; a failed check leaves the folder untouched."""
        batch = self.data.sample_batch(2)
        loss_steps = ("calculate_train_batch_loss", "calculate_eval_batch_loss")
        if batch is not None and any(getattr(type(self), n) is not getattr(Trainer, n) for n in loss_steps):
            if self.check_steps_before_run:
                check_loss_step(self.calculate_eval_batch_loss, self.model, batch, type(self).__name__)
        elif batch is not None:
            check_model_fits_loss(bare_model(self.accelerator, self.model), self.loss_fn, batch)  # not compiled for 2
        self.run_folder.claim(self.config, self._graph_description())

    def _graph_description(self) -> str:
        from phasetrain.render import describe  # `phasetrain graph RUN_DIR` draws it, importing no phase
        return describe(self.machine.graph).to_json()

    def train_epoch(self) -> None:
        """One epoch of optimizer steps on this process's shard. After a mid-epoch resume it continues from
        ``state.batch_in_epoch``: the consumed batches are skipped by index, not loaded."""
        state = self.state
        accumulation = self.data.epoch_accumulation(state.epoch_start_sample)
        self.model.train()
        self._train_loss.begin(state.epoch)
        self.train_epoch_start()
        # A stop requested (or max_steps reached) at the step a checkpoint was taken at ends a resumed epoch
        # there, as it did then. With several processes they agree first (an enter hook may have asked on one).
        self._signals.agree(state)  # a signal waits for the first step's check
        done = state.stop_requested or state.reached_max_steps
        batches = () if done else self.data.train_batches(state.epoch, skip=state.batch_in_epoch,
                                                          start=state.epoch_start_sample)
        for batch in batches:
            group_size = accumulation.group_size(state.batch_in_epoch)  # the epoch's last group may be short
            if state.micro_step == 0:
                self.callbacks.fire("on_train_step_start", self)
            state.micro_step += 1  # counted before the forward: a checkpoint from now to the step is refused
            last = state.micro_step == group_size
            batch = self.data.to_device(batch)
            with self._gradient_sync(last):  # DDP all-reduces in backward: only on a step's last micro-batch
                output = self.calculate_train_batch_loss(batch)
                loss = output["loss"] / group_size if group_size > 1 else output["loss"]
                self.callbacks.fire("on_before_backward", self, loss)
                self.backward_step(loss)
                self.callbacks.fire("on_after_backward", self)
            self._train_loss.add(output["loss"].detach(), int(output["batch_size"]), group_size, state.micro_step == 1)
            state.batch_in_epoch += 1
            self.callbacks.fire("on_train_batch_end", self, batch, output)
            if last:
                self._update_weights(skip=not self._step_loss_is_finite(group_size))
                if self._signals.stop_agreed or state.reached_max_steps:
                    break
        if state.micro_step:  # an iterable dataset ended inside an accumulation group
            self._update_weights(skip=not self._step_loss_is_finite(state.micro_step))
        # An epoch stopped before its first step has no loss to report (a 0 would read as a perfect one). Reading
        # the loss syncs the device, so the clock read after it is true time.
        trained = state.optimizer_step > state.epoch_start_step
        loss = {"train/loss": self._train_loss.epoch_mean(self._sum_over_processes)} if trained else {}
        self.log({**loss, "train/lr": self._lr()}, time=self._rate(self._epoch_rate))
        self.train_epoch_end()

    def _step_loss_is_finite(self, micro_batches: int) -> bool:
        """Whether this optimizer step's loss is finite on every process, asked before the step updates the
        weights. A non-finite one stops the run (NonFiniteLossError), or with ``train.nonfinite_loss: skip``
        the step is skipped and its loss left out of the means: then this returns False.

        Note: one host sync per optimizer step, after the step's last backward was queued; with several
        processes also one tiny all-reduce, because the gradients are averaged: every process must decide
        alike, or one would step with the NaN another skipped. The same all-reduce agrees on stopping
        (``StopSignals.agree``): a stop one process requests mid-epoch ends the epoch one step later on all.
        """
        value = self._train_loss.step_loss.item()
        finite = math.isfinite(value)  # on the host: torch.isfinite on a 0-d tensor costs 20x more on a CPU
        if self.accelerator.num_processes > 1:
            finite = not self._signals.agree(self.state, nonfinite=not finite)
            self._agreed_before_step = self.state.optimizer_step + 1
        if finite:
            return True
        state = self.state
        first = state.batch_in_epoch - micro_batches
        batches = f"batch {first}" if micro_batches == 1 else f"batches {first}-{state.batch_in_epoch - 1}"
        where = (f"{f'({value})' if not math.isfinite(value) else 'on another process'} at epoch {state.epoch}, "
                 f"optimizer step {state.optimizer_step + 1} ({batches} of the epoch, counting from 0)")
        if self.config.train.nonfinite_loss == "skip":
            warnings.warn(f"non-finite loss {where}: optimizer step skipped", stacklevel=3)
            self._train_loss.drop_step()
            return False
        self.wait_for_checkpoints()
        latest = self._checkpoints.all()
        raise NonFiniteLossError(
            f"non-finite loss {where}: stopped before the weights were updated; "
            f"{f'the last checkpoint, {latest[-1].name}, is intact' if latest else 'no checkpoint was written'}. "
            "Look for NaN/inf in the inputs or a too-high learning rate, or set train.nonfinite_loss=skip "
            "to skip such steps")

    def _update_weights(self, skip: bool = False) -> None:
        if not skip:  # a skipped step's gradients are dropped by the zero_grad below
            self.clip_gradients()
            self.optimizer_step()
        self.scheduler_step()
        self.optimizer_zero_grad()
        self.end_optimizer_step(self._train_loss.step_loss)

    def end_optimizer_step(self, loss: torch.Tensor) -> None:
        """After every optimizer step: count it, fire ``on_train_step_end``, log a step record every
        ``train.log_every_steps``, then stop for a signal or save a mid-epoch checkpoint when due.
        A ``train_epoch`` of your own calls it after each optimizer step."""
        state = self.state
        state.optimizer_step += 1
        state.micro_step = 0
        self._train_loss.end_step(loss)
        self.callbacks.fire("on_train_step_end", self, loss)
        every = self.config.train.log_every_steps
        if every and state.optimizer_step % every == 0:  # a device sync, once per log_every_steps
            mean = self._train_loss.mean_since_last_read()  # the clock is read after it: the device is in sync
            self.log({"train/loss": mean, "train/lr": self._lr()}, kind="step", time=self._rate(self._step_rate))
        # Several processes agreed before this step's update (_step_loss_is_finite); one process, or a
        # train_epoch of your own that does not call that check, agrees now.
        if self._agreed_before_step != state.optimizer_step:
            self._signals.agree(state)
        if self._signals.signal_pending:
            self._stop_for_signal()
        every = self.config.checkpoint.every_steps or 0
        if every and state.optimizer_step % every == 0:
            self.save_checkpoint()

    def eval_epoch(self) -> None:
        """Loss and every metric over the eval set, logged as ``eval/loss``, ``eval/<metric>``."""
        self.eval_epoch_start()
        self.log(prefixed("eval", self._evaluate(self.data.eval, hooks=True)))
        self.eval_epoch_end()

    def finish_run(self) -> None:
        """Evaluate the test split if there is one (logged as ``test/...``), then write the final weights."""
        if self.data.test is not None:
            self.log(prefixed("test", self._evaluate(self.data.test, hooks=False)))
        self.wait_for_checkpoints()  # final weights mark the run finished: its last checkpoint is on disk first
        self.run_folder.write_final_weights(self.accelerator, self.model)

    def _gradient_sync(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext() if sync or self.accelerator.num_processes == 1 else self.accelerator.no_sync(self.model)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
