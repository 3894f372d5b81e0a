"""One timed training run in this (fresh) process: the child that benchmarks/run.py starts for every table cell.

    python -m benchmarks.loops --loop plain --workload tiny --epochs 6 --out result.json

Every loop trains the same model on the same data with plain SGD, cross-entropy and the same batch size, and
tells a ``Record`` when each epoch starts, through that library's own epoch-start hook (inline for the loops
written by hand). A hook on the torch optimizer counts the optimizer steps, so the parent can check that
every loop did the same work: the optimizer is hooked before a library wraps it. The libraries are imported
inside their own loop function, so a child loads only the library it times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.workloads import WORKLOADS, Workload


@dataclasses.dataclass
class Record:
    """What a child measures: epoch starts (perf_counter), optimizer steps, memory."""

    device: str
    epoch_starts: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0
    first_step_wall: float | None = None  # time.time() after the first optimizer step: the parent compares it
    rss_before_bytes: int = 0  # resident memory just before the training call
    call_started: float = 0.0
    call_returned: float = 0.0

    def count_steps(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.first_step_wall is None:
            self.first_step_wall = time.time()

    def epoch_started(self) -> None:
        self._sync()
        self.epoch_starts.append(time.perf_counter())

    def training_starts(self) -> None:
        self.rss_before_bytes = resident_bytes()
        self.call_started = time.perf_counter()

    def training_returned(self) -> None:
        self._sync()
        self.call_returned = time.perf_counter()

    def _sync(self) -> None:
        # On a GPU the host runs ahead of the device: wait for the queued work, so an epoch's time is the
        # time its work took. Every loop pays this once an epoch.
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


@dataclasses.dataclass
class Job:
    workload: Workload
    epochs: int
    seed: int
    device: str
    dataset: TensorDataset
    scratch: pathlib.Path  # a temporary folder for run folders and checkpoints


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def model_and_optimizer(job: Job, record: Record) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(job.seed)
    model = job.workload.build_model().to(job.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=job.workload.lr)
    record.count_steps(optimizer)
    return model, optimizer


def shuffled_loader(job: Job) -> DataLoader[Any]:
    return DataLoader(job.dataset, batch_size=job.workload.batch_size, shuffle=True)


# ---- the loops ---------------------------------------------------------------------------------------
def plain(job: Job, record: Record) -> None:
    """A hand-written PyTorch loop, as a tutorial writes it."""
    model, optimizer = model_and_optimizer(job, record)
    loss_fn = nn.CrossEntropyLoss()
    loader = shuffled_loader(job)
    record.training_starts()
    model.train()
    for _ in range(job.epochs):
        record.epoch_started()
        for inputs, targets in loader:
            inputs, targets = inputs.to(job.device), targets.to(job.device)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    record.training_returned()


def plain_indexed(job: Job, record: Record) -> None:
    """The plain loop without a DataLoader: each batch indexed out of the dataset's tensors at once, as one who
    knows the data is a TensorDataset writes it (phasetrain reads a TensorDataset so too)."""
    model, optimizer = model_and_optimizer(job, record)
    loss_fn = nn.CrossEntropyLoss()
    inputs_all, targets_all = job.dataset.tensors
    batch_size = job.workload.batch_size
    record.training_starts()
    model.train()
    for _ in range(job.epochs):
        record.epoch_started()
        order = torch.randperm(len(targets_all))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs, targets = inputs_all[batch].to(job.device), targets_all[batch].to(job.device)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    record.training_returned()


def accelerate_loop(job: Job, record: Record) -> None:
    """A hand-written loop through accelerate: prepare(), accelerator.backward()."""
    from accelerate import Accelerator
    model, optimizer = model_and_optimizer(job, record)
    accelerator = Accelerator(cpu=job.device == "cpu")
    model, optimizer, loader = accelerator.prepare(model, optimizer, shuffled_loader(job))
    loss_fn = nn.CrossEntropyLoss()
    record.training_starts()
    model.train()
    for _ in range(job.epochs):
        record.epoch_started()
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    record.training_returned()


def ignite_loop(job: Job, record: Record) -> None:
    """ignite's create_supervised_trainer, run for the epochs."""
    from ignite.engine import Events, create_supervised_trainer
    model, optimizer = model_and_optimizer(job, record)
    trainer = create_supervised_trainer(model, optimizer, nn.CrossEntropyLoss(), device=job.device)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: record.epoch_started())
    loader = shuffled_loader(job)
    record.training_starts()
    trainer.run(loader, max_epochs=job.epochs)
    record.training_returned()


def lightning_loop(job: Job, record: Record) -> None:
    """A LightningModule with training_step and configure_optimizers, fitted by a default ``lightning.Trainer``
    on the CPU: its progress bar, model summary, logger and per-epoch ModelCheckpoint all kept, as a user
    gets them (``default_root_dir`` in a temporary folder)."""
    import lightning

    # Defined here: lightning is imported only by the child that times it.
    class Module(lightning.LightningModule):
        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = nn.CrossEntropyLoss()
            self.optimizer = optimizer

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            inputs, targets = batch
            loss: torch.Tensor = self.loss_fn(self.model(inputs), targets)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.optimizer

    class EpochStarts(lightning.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            record.epoch_started()

    model, optimizer = model_and_optimizer(job, record)
    trainer = lightning.Trainer(max_epochs=job.epochs, accelerator="cpu", devices=1,
                                default_root_dir=str(job.scratch / "lightning"), callbacks=[EpochStarts()])
    module, loader = Module(model, optimizer), shuffled_loader(job)
    record.training_starts()
    trainer.fit(module, loader)
    record.training_returned()


def pytorch_accelerated_loop(job: Job, record: Record) -> None:
    """pytorch-accelerated's Trainer with its default callbacks (progress bar, printed and logged metrics)."""
    from pytorch_accelerated.callbacks import TrainerCallback
    from pytorch_accelerated.trainer import DEFAULT_CALLBACKS, Trainer

    class EpochStarts(TrainerCallback):
        def on_train_epoch_start(self, trainer: Any, **kwargs: Any) -> None:
            record.epoch_started()

    model, optimizer = model_and_optimizer(job, record)
    trainer = Trainer(model=model, loss_func=nn.CrossEntropyLoss(), optimizer=optimizer,
                      callbacks=(*DEFAULT_CALLBACKS, EpochStarts))
    record.training_starts()
    # num_workers=0, as for every other loop: its default (a worker per CPU) would time worker start-up
    trainer.train(train_dataset=job.dataset, num_epochs=job.epochs, per_device_batch_size=job.workload.batch_size,
                  train_dataloader_kwargs={"num_workers": 0})
    record.training_returned()


def phasetrain_config(job: Job, train: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The run's config: the workload by import spec, ``train``/``checkpoint`` options over the defaults."""
    return {
        "run_dir": str(job.scratch / "run"), "seed": job.seed,
        "model": {"target": job.workload.model},
        "loss": "torch.nn:CrossEntropyLoss",
        "optimizer": {"target": "torch.optim:SGD", "args": {"lr": job.workload.lr}},
        "train": {"epochs": job.epochs, "batch_size": job.workload.batch_size, **train},
        "checkpoint": checkpoint,
    }


def phasetrain_loop(job: Job, record: Record, config: dict[str, Any]) -> None:
    from benchmarks.phasetrain_callbacks import EpochStarts
    from phasetrain import RunConfig, Trainer
    trainer = Trainer(RunConfig.from_dict(config), train_data=job.dataset, callbacks=[EpochStarts(record)])
    record.training_starts()
    trainer.run()
    record.training_returned()


def phasetrain_defaults(job: Job, record: Record) -> None:
    """The library's defaults: progress bar, console lines, metrics.jsonl, a checkpoint every epoch."""
    phasetrain_loop(job, record, phasetrain_config(job, train={}, checkpoint={}))


def phasetrain_off(job: Job, record: Record) -> None:
    """Everything optional off: no progress bar, no per-step records, no checkpoints."""
    options = {"progress_bar": False, "log_every_steps": 0}
    phasetrain_loop(job, record, phasetrain_config(job, train=options, checkpoint={"every_epochs": 0}))


def phasetrain_compiled(job: Job, record: Record) -> None:
    """The defaults with ``train.compile: true`` (torch.compile; the first epoch pays the compilation)."""
    phasetrain_loop(job, record, phasetrain_config(job, train={"compile": True}, checkpoint={}))


def phasetrain_bf16(job: Job, record: Record) -> None:
    """The defaults with ``train.mixed_precision: bf16``."""
    phasetrain_loop(job, record, phasetrain_config(job, train={"mixed_precision": "bf16"}, checkpoint={}))


LOOPS: dict[str, Callable[[Job, Record], None]] = {
    "plain": plain,
    "plain-indexed": plain_indexed,
    "phasetrain": phasetrain_defaults,
    "phasetrain-off": phasetrain_off,
    "accelerate": accelerate_loop,
    "ignite": ignite_loop,
    "lightning": lightning_loop,
    "pytorch-accelerated": pytorch_accelerated_loop,
    "phasetrain-compiled": phasetrain_compiled,
    "phasetrain-bf16": phasetrain_bf16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--steps-per-epoch", type=int, help="default: the workload's")
    parser.add_argument("--batch-size", type=int, help="default: the workload's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where the result goes, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    workload = dataclasses.replace(workload, steps_per_epoch=args.steps_per_epoch or workload.steps_per_epoch,
                                   batch_size=args.batch_size or workload.batch_size)
    record = Record(args.device)
    with tempfile.TemporaryDirectory(prefix="phasetrain-bench-") as scratch:
        job = Job(workload, args.epochs, args.seed, args.device, workload.dataset(), pathlib.Path(scratch))
        LOOPS[args.loop](job, record)
    result = {**dataclasses.asdict(record), "loop": args.loop, "workload": args.workload,
              "peak_rss_bytes": peak_resident_bytes(), "torch_threads": torch.get_num_threads(),
              "cuda_peak_bytes": None, "cuda_device_name": None}
    if args.device.startswith("cuda"):
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(torch.device(args.device))
        result["cuda_device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
