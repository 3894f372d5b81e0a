"""Data order owned by phasetrain: each epoch's order is drawn from (run seed, epoch) alone.

Why not accelerate's prepared dataloader: an exact resume needs the order of epoch k to be a pure
function of the seed and k, and a mid-epoch resume needs to skip consumed batches by index without
loading them. Drawing the shuffle from the global RNG (what a plain ``shuffle=True`` loader does)
breaks both; so does the DataLoader drawing its worker base seed from the global RNG. Here the
sampler has its own generator and the loader gets its own ``generator`` for the worker seed.
The sampler also shards batches across processes, so no wrapper does work per batch. A batch that
fails to load is explained by ``phasetrain.loading``; workers leave stop signals to the main process
(``phasetrain.worker_signals``).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from phasetrain.errors import DataError
from phasetrain.loading import CheckedBatches
from phasetrain.worker_signals import worker_init


def shard_size(size: int, rank: int, world_size: int, pad: bool) -> int:
    """Samples process ``rank`` gets of ``size``: every ``world_size``-th one, after padding (when ``pad``) to
    a multiple of ``world_size``, so that every process gets as many."""
    if world_size > 1 and pad and size % world_size:
        size += world_size - size % world_size
    return len(range(rank, size, world_size))


def batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in ``samples``: the last one short, or dropped with ``drop_last``."""
    return samples // batch_size if drop_last else ceil_div(samples, batch_size)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order: depends on nothing but the run seed and the epoch number."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


class EpochBatchSampler:
    """Yields this process's batches (lists of dataset indices) for one epoch, from batch ``skip`` on.

    The permutation is computed eagerly from its own generator, never the global RNG. With several
    processes, ``pad=True`` (training) repeats the first indices so every process gets the same
    number of batches (DDP needs that); ``pad=False`` (evaluation) shards without duplicates.
    ``limit`` keeps the first batches only (``train.limit_batches``). ``start`` drops the epoch's first
    samples before sharding: those a run with another process count consumed before a resume (the
    processes shard by interleaving, so after ``b`` batches of ``B`` on ``W`` processes the order's first
    ``b * B * W`` samples are consumed, whatever the rank).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 epoch: int, rank: int = 0, world_size: int = 1, pad: bool = True, skip: int = 0,
                 limit: int | None = None, start: int = 0) -> None:
        order = list(range(size))
        if shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            order = torch.randperm(size, generator=generator).tolist()
        order = order[start:]
        if world_size > 1:
            while pad and order and len(order) % world_size:  # a loop: fewer samples than processes need more than one pass
                order += order[: world_size - len(order) % world_size]
            order = order[rank::world_size]
        base = epoch_seed(seed, epoch) * 1_000_003 + rank
        count = batch_count(len(order), batch_size, drop_last)
        if limit is not None:  # train.limit_batches: the epoch's first `limit` batches, in the same order
            count = min(count, limit)
        self.batches = [Batch(order[n * batch_size : (n + 1) * batch_size], (base + n * 7_919) % (2**63 - 1))
                        for n in range(count)]
        self.skip = skip

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches[self.skip :])

    def __len__(self) -> int:
        return len(self.batches) - self.skip

    def yielded(self, number: int) -> Batch:
        """The ``number``-th batch (0-based) that iterating this sampler yields, counted from ``skip``."""
        return self.batches[self.skip + number]


class Batch(list[int]):
    """The dataset indices of one batch, with a seed of its own for worker processes (see WorkerSeeded)."""

    def __init__(self, indices: list[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


class WorkerSeeded(Dataset[Any]):
    """Seeds python, numpy and torch RNGs in a DataLoader worker from the batch itself before loading it.

    A worker's RNG otherwise depends on how many batches that worker loaded before, so after a
    mid-epoch resume (fresh workers, skipped batches) random augmentation would draw other numbers.
    Seeded per batch, every batch's draws depend on (run seed, epoch, batch number) alone. In the main
    process (``num_workers=0``) nothing is reseeded: the checkpoint's RNG state covers that case.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if isinstance(indices, Batch) and torch.utils.data.get_worker_info() is not None:
            random.seed(indices.seed)
            np.random.seed(indices.seed % 2**32)
            torch.manual_seed(indices.seed)
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]


class BatchIndexed(Dataset[Any]):
    """A ``TensorDataset`` read a batch at a time: each tensor indexed once with the batch's indices gives the
    batch torch's default collate would build (a list of the stacked samples), without ``batch_size``
    ``__getitem__`` calls and a stack per tensor: about a fifth of a step of a small MLP here. Only for
    contiguous tensors: indexing another layout (channels_last, a transpose) may keep it, where stacking
    gives a contiguous batch."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        batch = torch.as_tensor(indices)
        return [tensor[batch] for tensor in self.dataset.tensors]


def as_is(batch: Any) -> Any:
    """The collate function of a batch that is already made (``BatchIndexed``)."""
    return batch


def check_dataset(dataset: Any, name: str) -> None:
    """Refuse what cannot be batched: not a dataset, or empty."""
    if dataset is None:
        raise DataError(f"{name} is missing: expected a torch Dataset")
    if isinstance(dataset, IterableDataset):
        return  # length unknown until iterated; resume warns that it cannot be exact
    if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
        raise DataError(f"{name} is a {type(dataset).__name__}: expected a map-style torch Dataset "
                        "(with __len__ and __getitem__)")
    if len(dataset) == 0:
        raise DataError(f"{name} is empty (0 samples): expected at least one sample")


def make_loader(dataset: Dataset[Any], sampler: EpochBatchSampler, *, num_workers: int, seed: int,
                pin_memory: bool, label: str, collate_fn: Callable[[list[Any]], Any] | None = None) -> CheckedBatches:
    """A plain DataLoader over ``sampler``; its own generator keeps the global RNG untouched (creating an
    iterator draws a worker base seed from the loader's generator even with ``num_workers=0``). ``label``
    names the dataset in errors, e.g. "train dataset (MyImages)"."""
    loaded: Dataset[Any] = dataset
    if collate_fn is None and type(dataset) is TensorDataset and all(t.is_contiguous() for t in dataset.tensors):
        loaded, collate_fn = BatchIndexed(dataset), as_is
    loaded = WorkerSeeded(loaded) if num_workers > 0 else loaded
    loader = DataLoader(loaded, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=worker_init(num_workers))
    return CheckedBatches(loader, sampler, dataset, label)
