"""The run's data, batched: one owner for every fact about batches.

``RunData`` holds the train/eval/test datasets and knows, once for the whole run, how many micro-batches
a train epoch has on this process, how they group into optimizer steps (``Accumulation``, with its short
last group), how to build an epoch's loader (skipping consumed batches by index after a resume), how to
move a batch to the device and how a batch unpacks into inputs and targets. Nothing else re-derives
these; ``phasetrain plan`` builds a ``RunData`` without a model or an Accelerator.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from phasetrain.config import TrainConfig
from phasetrain.data import EpochBatchSampler, batch_count, ceil_div, epoch_seed, make_loader, shard_size
from phasetrain.errors import DataError
from phasetrain.loading import load_error, named_errors
from phasetrain.schedulers import RunLength
from phasetrain.worker_signals import worker_init


@dataclass(frozen=True)
class Accumulation:
    """How an epoch's micro-batches group into optimizer steps: runs of ``per_step`` from the epoch's
    first batch, the last run shorter when ``batches`` is not a multiple of ``per_step``."""

    batches: int | None  # per epoch on this process; None when unknown (an iterable dataset without a length)
    per_step: int

    @property
    def steps(self) -> int | None:
        """Optimizer steps per epoch (None when the batch count is unknown)."""
        return None if self.batches is None else ceil_div(self.batches, self.per_step)

    def group_size(self, batch_index: int) -> int:
        """Micro-batches in the group that batch ``batch_index`` (0-based, in the epoch) belongs to."""
        if self.batches is None:
            return self.per_step
        group_start = batch_index - batch_index % self.per_step
        return min(self.per_step, self.batches - group_start)


class RunData:
    """The train, eval and test datasets of a run and how this process batches them.

    Train batches come from ``EpochBatchSampler`` (order a pure function of seed and epoch, sharded
    across processes and padded to equal length); eval batches are sharded without duplicates.
    ``collate_fn`` makes a batch of a list of samples (torch's ``default_collate`` when None).
    """

    def __init__(self, datasets: Mapping[str, Any], cfg: TrainConfig, seed: int, *, process_index: int = 0,
                 num_processes: int = 1, device: torch.device | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.train, self.eval, self.test = datasets["train"], datasets.get("eval"), datasets.get("test")
        self._cfg, self._seed, self._limit = cfg, seed, cfg.resolved_limit_batches
        self.collate_fn = collate_fn
        self._rank, self._world_size = process_index, num_processes
        self._device = device if device is not None and device.type != "cpu" else None
        if self._device is not None:
            from accelerate.utils import send_to_device
            self._send = send_to_device
        self.batches_per_epoch = self._count(self.train, cfg.batch_size, pad=True, drop_last=cfg.drop_last)
        if self.batches_per_epoch == 0:
            shard = shard_size(len(self.train), process_index, num_processes, pad=True)
            raise DataError(f"train dataset has {shard} samples per process, fewer than "
                            f"batch_size {cfg.batch_size} with drop_last: no batch to train on")
        self.accumulation = Accumulation(self.batches_per_epoch, cfg.grad_accum_steps)

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per train epoch on this process (None for an iterable dataset without a length)."""
        return self.accumulation.steps

    def run_length(self, epochs: int, max_steps: int | None) -> RunLength:
        """How long the run is, for schedulers: every process takes the same number of optimizer steps."""
        steps = self.steps_per_epoch
        total = None if steps is None else epochs * steps
        if max_steps is not None:
            total = max_steps if total is None else min(total, max_steps)
        cfg = self._cfg
        return RunLength(epochs=epochs, steps_per_epoch=steps, total_steps=total, batch_size=cfg.batch_size,
                         eval_batch_size=cfg.resolved_eval_batch_size, num_processes=self._world_size,
                         grad_accum_steps=cfg.grad_accum_steps)

    def epoch_accumulation(self, start: int = 0) -> Accumulation:
        """The micro-batches of an epoch whose first ``start`` samples were consumed by a run with another
        process count (see ``consumed_samples``), grouped into optimizer steps."""
        if not start:
            return self.accumulation
        cfg = self._cfg
        return Accumulation(self._count(self.train, cfg.batch_size, pad=True, drop_last=cfg.drop_last, start=start),
                            cfg.grad_accum_steps)

    def consumed_samples(self, start: int, batches: int, num_processes: int) -> int:
        """Samples of an epoch's order consumed once ``num_processes`` processes have each taken ``batches``
        train batches from sample ``start`` on: where a resume with another process count re-shards from."""
        return min(len(self.train), start + batches * self._cfg.batch_size * num_processes)

    def train_batches(self, epoch: int, skip: int = 0, start: int = 0) -> Iterable[Any]:
        """This process's batches of ``epoch``, from batch ``skip`` on (skipped by index: nothing is loaded);
        ``start``: the samples of the epoch's order consumed before a resume with another process count."""
        cfg = self._cfg
        if isinstance(self.train, IterableDataset):
            loader = DataLoader(self.train, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                collate_fn=self.collate_fn, worker_init_fn=worker_init(cfg.num_workers))
            if skip:
                warnings.warn("resume is not exact: the train dataset is an IterableDataset, whose order "
                              f"phasetrain does not own; skipping {skip} batches by loading them", stacklevel=3)
            batches = itertools.islice(loader, skip, self._limit) if skip or self._limit else loader
            return named_errors(batches, self._label(self.train))
        sampler = self._sampler(self.train, cfg.batch_size, shuffle=cfg.shuffle, drop_last=cfg.drop_last, pad=True,
                                epoch=epoch, skip=skip, start=start)
        return make_loader(self.train, sampler, num_workers=cfg.num_workers, pin_memory=self._device is not None,
                           seed=epoch_seed(self._seed, epoch), label=self._label(self.train), collate_fn=self.collate_fn)

    def eval_batches(self, dataset: Any) -> Iterable[Any]:
        """Batches of ``dataset`` in order, sharded across processes without duplicates."""
        batch_size, workers = self._cfg.resolved_eval_batch_size, self._cfg.num_workers
        if isinstance(dataset, IterableDataset):
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=self.collate_fn,
                                worker_init_fn=worker_init(workers))
            return named_errors(itertools.islice(loader, self._limit) if self._limit else loader, self._label(dataset))
        sampler = self._sampler(dataset, batch_size, shuffle=False, drop_last=False, pad=False, epoch=0)
        return make_loader(dataset, sampler, num_workers=workers, pin_memory=self._device is not None, seed=self._seed,
                           label=self._label(dataset), collate_fn=self.collate_fn)

    def eval_batch_count(self, dataset: Any) -> int | None:
        """Batches ``eval_batches(dataset)`` yields on this process (None when unknown)."""
        return self._count(dataset, self._cfg.resolved_eval_batch_size, pad=False, drop_last=False)

    def sample_batch(self, size: int = 2) -> Any:
        """The first ``size`` train samples as one batch on the device, for checks (None for an iterable dataset)."""
        if isinstance(self.train, IterableDataset):
            return None
        indices = range(min(size, len(self.train)))
        try:
            batch = (self.collate_fn or torch.utils.data.default_collate)([self.train[i] for i in indices])
        except Exception as exc:
            raise load_error(self.train, self._label(self.train), indices, "the setup check's batch", exc) from exc
        return self.to_device(batch)

    def to_device(self, batch: Any) -> Any:
        """The batch on the run's device; on the CPU the batch itself (no per-batch traversal)."""
        return batch if self._device is None else self._send(batch, self._device, non_blocking=True)

    def _label(self, dataset: Any) -> str:
        """How errors name ``dataset``: its split and class, e.g. "eval dataset (ImageFolder)"."""
        split = next((name for name in ("train", "eval", "test") if getattr(self, name) is dataset), None)
        return f"{split + ' ' if split else ''}dataset ({type(dataset).__name__})"

    def _sampler(self, dataset: Any, batch_size: int, *, shuffle: bool, drop_last: bool, pad: bool, epoch: int,
                 skip: int = 0, start: int = 0) -> EpochBatchSampler:
        return EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=self._seed,
                                 epoch=epoch, pad=pad, skip=skip, rank=self._rank, world_size=self._world_size,
                                 limit=self._limit, start=start)

    def _count(self, dataset: Any, batch_size: int, *, pad: bool, drop_last: bool, start: int = 0) -> int | None:
        try:
            size = len(dataset) - start
        except TypeError:  # an iterable dataset without a length
            return None
        if isinstance(dataset, IterableDataset):  # its own sharding: each process reads what it yields
            count = batch_count(size, batch_size, drop_last=False)
        else:
            count = batch_count(shard_size(size, self._rank, self._world_size, pad), batch_size, drop_last)
        return count if self._limit is None else min(count, self._limit)


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch that is a tuple/list of two or a dict with those keys."""
    if isinstance(batch, dict):
        return batch["inputs"], batch.get("targets")
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None
