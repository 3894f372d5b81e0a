"""The override points of a Trainer: what a subclass changes, each a few lines.

``TrainerSteps`` is the base of ``Trainer``: the per-batch steps (``calculate_train_batch_loss``,
``backward_step``, ``optimizer_step``, ...), the start/end points of the run and its epochs, and
``evaluate``/``predict`` with the eval loop they share. Nothing here drives the run or calls back into
it; ``trainer.py`` does that (the walk, ``train_epoch``, ``eval_epoch``, checkpoints, resume).
"""
from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import Dataset

from phasetrain.accelerator import gather_in_order
from phasetrain.batches import RunData, unpack_batch
from phasetrain.callbacks import Callback, CallbackList, default_callbacks
from phasetrain.checks import eval_mode
from phasetrain.components import build_scheduler
from phasetrain.config import RunConfig
from phasetrain.data import check_dataset
from phasetrain.history import RunHistory
from phasetrain.schedulers import RunLength

BatchOutput = dict[str, Any]  # {"loss": Tensor, "model_outputs": Any, "batch_size": int}


class TrainerSteps:
    """Override points and the eval loop. The attributes are set by ``Trainer.__init__``."""

    config: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any  # accelerate's AcceleratedOptimizer around the torch optimizer
    scheduler: Any
    loss_fn: Any
    metrics: dict[str, Any]
    data: RunData
    run_length: RunLength
    callbacks: CallbackList
    _direct: bool  # backward and optimizer calls skip accelerate's wrappers (see accelerator.direct_steps)
    _scheduler_stepping: str  # bookkeeping.scheduler_stepping: "step", "epoch", "plateau" or "none"
    _step_optimizer: Any

    # ---- the run and its epochs (no-ops unless overridden) ---------------------------------------------
    def training_run_start(self) -> None:
        """Start of every ``run()`` call (also a resumed one), before ``on_run_start``."""

    def training_run_end(self) -> None:
        """End of a run that reached ``done``, before ``on_run_end``."""

    def train_epoch_start(self) -> None:
        """Start of the train loop of an epoch (again after a mid-epoch resume); the model is in train mode."""

    def train_epoch_end(self) -> None:
        """End of a train epoch, after its ``train/loss`` record."""

    def eval_epoch_start(self) -> None:
        """Start of an eval epoch."""

    def eval_epoch_end(self) -> None:
        """End of an eval epoch, after its ``eval/...`` record."""

    def create_scheduler(self) -> Any:
        """The LR scheduler (None for none), built once the data is sharded: the config's ``scheduler``,
        with its run-length placeholders (``"{total_steps}"``) taken from ``self.run_length``."""
        return build_scheduler(self.config.scheduler, self.optimizer.optimizer, self.run_length)

    def create_run_history(self) -> RunHistory:
        """The object ``trainer.run_history`` holds: every epoch-level metric of the run."""
        return RunHistory()

    def default_callbacks(self) -> list[Callback]:
        """Callbacks every run gets; a user callback of the same class replaces the default one."""
        return default_callbacks(progress_bar=self.config.train.progress_bar)

    # ---- per batch -----------------------------------------------------------------
    def calculate_train_batch_loss(self, batch: Any) -> BatchOutput:
        """Forward one training batch ``(inputs, targets)``; return loss, model outputs and batch size."""
        inputs, targets = unpack_batch(batch)
        outputs = self.model(inputs)
        return {"loss": self.loss_fn(outputs, targets), "model_outputs": outputs, "batch_size": len(inputs)}

    def calculate_eval_batch_loss(self, batch: Any) -> BatchOutput:
        """Forward one eval batch (already under ``torch.no_grad``); same return as the train step."""
        return self.calculate_train_batch_loss(batch)

    def backward_step(self, loss: torch.Tensor) -> None:
        if self._direct:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # scales the loss for fp16, routes DeepSpeed/Megatron

    def clip_gradients(self) -> None:
        """On the optimizer step only (never a partial accumulation); accelerate unscales fp16 gradients first."""
        train = self.config.train
        if train.max_grad_value is not None:
            self.accelerator.clip_grad_value_(self.model.parameters(), train.max_grad_value)
        if train.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), train.max_grad_norm)

    def optimizer_step(self) -> None:
        self._step_optimizer.step()

    def optimizer_zero_grad(self) -> None:
        self._step_optimizer.zero_grad(set_to_none=True)

    def scheduler_step(self) -> None:
        """After every optimizer step (a skipped one too): step the LR scheduler if it runs per step.
        One with ``interval: epoch`` steps after each train epoch's record, and a ReduceLROnPlateau on
        ``checkpoint.monitor`` whenever a record carries it; the trainer does both (``bookkeeping.py``)."""
        if self._scheduler_stepping == "step":
            self.scheduler.step()

    def update_metrics(self, batch: Any, batch_output: BatchOutput) -> None:
        _, targets = unpack_batch(batch)
        for metric in self.metrics.values():
            metric.update(batch_output["model_outputs"], targets)

    def predict_step(self, batch: Any) -> Any:
        inputs, _ = unpack_batch(batch)
        return self.model(inputs)

    # ---- evaluation and prediction --------------------------------------------------------------------
    def evaluate(self, dataset: Dataset[Any]) -> dict[str, float]:
        """Loss and metrics of the model on ``dataset``: ``{"loss": ..., "accuracy": ...}``; logs nothing."""
        check_dataset(dataset, "evaluate(dataset)")
        return self._evaluate(dataset, hooks=False)

    def predict(self, dataset: Dataset[Any]) -> Any:
        """Model outputs for every sample of ``dataset`` in dataset order, gathered across processes."""
        check_dataset(dataset, "predict(dataset)")
        outputs: list[Any] = []
        with eval_mode(self.model), torch.no_grad():
            for batch in self.data.eval_batches(dataset):
                outputs.append(send_to_device(self.predict_step(self.data.to_device(batch)), "cpu"))
        local = torch.cat(outputs) if outputs and isinstance(outputs[0], torch.Tensor) else outputs
        if self.accelerator.num_processes == 1:
            return local
        return gather_in_order(local, len(dataset), self.accelerator.num_processes)  # type: ignore[arg-type]

    def _evaluate(self, dataset: Any, hooks: bool) -> dict[str, float]:
        """Mean loss and every metric over ``dataset``, exact across processes (no padded duplicates)."""
        device = self.accelerator.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        samples = torch.zeros((), device=device, dtype=torch.float64)
        with eval_mode(self.model), torch.no_grad():
            for batch in self.data.eval_batches(dataset):
                if hooks:
                    self.callbacks.fire("on_eval_step_start", self)
                batch = self.data.to_device(batch)
                output = self.calculate_eval_batch_loss(batch)
                loss_sum += output["loss"].detach().double() * output["batch_size"]
                samples += output["batch_size"]
                self.update_metrics(batch, output)
                if hooks:
                    self.callbacks.fire("on_eval_step_end", self, batch, output)
        totals = self._sum_over_processes(torch.stack([loss_sum, samples]))  # one sync per evaluation
        results = {"loss": (totals[0] / totals[1]).item()}
        for name, metric in self.metrics.items():
            results[name] = float(metric.compute())  # torchmetrics syncs its state across processes here
            metric.reset()
        return results

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

