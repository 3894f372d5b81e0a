"""A batch that fails to load, explained: which dataset, which item, and how it fails.

Looked for only after a batch failed, so the happy path checks nothing: the failed batch's items are
read again one by one in the main process, and the first that raises or is None is named.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, default_collate

from phasetrain.errors import DataError
from phasetrain.worker_signals import stop_signals_blocked

if TYPE_CHECKING:
    from phasetrain.data import EpochBatchSampler


class CheckedBatches:
    """The batches of one pass of a DataLoader over an ``EpochBatchSampler``. A batch that fails to load
    ends the pass with a ``DataError`` naming the dataset and the item, found by re-reading that batch's
    items one by one in this process. Until then nothing is checked: the happy path pays one generator
    step per batch, no work per item."""

    def __init__(self, loader: DataLoader[Any], sampler: EpochBatchSampler, dataset: Any, label: str) -> None:
        self.loader, self.sampler, self.dataset, self.label = loader, sampler, dataset, label

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        with stop_signals_blocked(self.loader.num_workers > 0):
            batches = iter(self.loader)  # starts the workers
        try:
            yield from batches
        except Exception as exc:
            # The run ends here, so stop the workers now: left to the garbage collector (tracebacks hold the
            # iterator in cycles), torch's shutdown waits 5 s per worker on queues collected with it.
            getattr(batches, "_shutdown_workers", lambda: None)()
            raise self._error(getattr(batches, "_num_yielded", None), exc) from exc

    def _error(self, failed: int | None, exc: Exception) -> DataError:
        """The error for batch number ``failed`` of this pass (None when unknown) failing with ``exc``."""
        if failed is None:  # a torch that does not count the batches it returned: the dataset can still be named
            return DataError(f"{self.label}: loading a batch failed with {summary(exc)}")
        # torch returns batches in the sampler's order and counts those it returned (also with workers,
        # which may have loaded later ones already): the failed batch is the next one.
        where = f"batch {self.sampler.skip + failed + 1} of {len(self.sampler.batches)}"
        return load_error(self.dataset, self.label, self.sampler.yielded(failed), where, exc)


def named_errors(batches: Iterable[Any], label: str) -> Iterator[Any]:
    """The batches of a loader whose items cannot be read again by index (an IterableDataset): a failure
    is still one DataError naming the dataset, with the original error's first line."""
    try:
        yield from batches
    except Exception as exc:
        raise DataError(f"{label}: loading a batch failed with {summary(exc)}") from exc


def load_error(dataset: Any, label: str, indices: Sequence[int], where: str, exc: Exception) -> DataError:
    """Why the items ``indices`` (``where``: "batch 3 of 40") failed to load as one batch with ``exc``.

    Re-read one by one in this process, the first item that raises or is None is named; then the batch is
    collated again. What this process cannot reproduce (a worker killed by the OOM killer, a file handle
    only a worker lost) is still reported with the dataset, the batch and ``exc``.
    """
    items = []
    for index in indices:
        try:
            item = dataset[index]
        except Exception as error:  # noqa: BLE001 - whatever __getitem__ raises is the answer, not a failure
            hint = (f"len() says {len(dataset)}; __len__ may be larger than the data" if isinstance(error, IndexError)
                    else "fix __getitem__ for this index, or leave the index out of the dataset")
            return DataError(f"{label}: reading item {index} raised {summary(error)}; {hint}")
        if item is None:
            return DataError(f"{label}: item {index} is None: __getitem__ must return a sample (a tensor, or a "
                             "tuple or dict of them); return one for this index, or leave the index out")
        items.append(item)
    shown = f"items {_some(indices)}"
    try:
        default_collate(items)
    except Exception as error:  # noqa: BLE001 - as above: the collate error is the answer
        return DataError(f"{label}: the items of {where} ({shown}) load but do not stack into one batch: "
                         f"{summary(error)}; every item needs the same structure and tensor shapes")
    return DataError(f"{label}: loading {where} ({shown}) failed with {summary(exc)}; reading its items again one "
                     "by one in the main process worked, so look at what differs in a DataLoader worker (memory, "
                     "open files, state set up in the main process) or run with train.num_workers=0")


def summary(exc: BaseException) -> str:
    """``Type: first line`` of an exception; for one re-raised from a DataLoader worker, the worker's own."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[1].startswith("Original Traceback"):
        # torch put the worker's traceback in the message: the worker's error is its last "Type: ..." line.
        own = re.compile(rf"(?:[\w.]+\.)?{type(exc).__name__}(?::|$)")
        return next((line for line in reversed(lines) if own.match(line)), lines[0])
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _some(indices: Sequence[int], shown: int = 4) -> str:
    head = ", ".join(str(i) for i in indices[:shown])
    return head if len(indices) <= shown else f"{head}, ... ({len(indices)} in all)"
