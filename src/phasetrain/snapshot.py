"""A copy of state dicts that training may go on changing: what a background checkpoint writes.

Containers are rebuilt; numbers and strings are immutable and kept as they are. Tensors are copied a
storage at a time, each storage once, and every tensor is rebuilt as the same view of its storage's
copy: tensors that share memory (tied weights, a buffer and a slice of it) share it in the copy, as
``torch.save`` keeps them, so a background checkpoint loads exactly as a blocking one. A CUDA storage is
copied to pinned host memory without waiting for the device (a device copy would hold the model and
optimizer state a second time in GPU memory): the copy is queued on the current stream, so the optimizer
steps queued after it cannot change what it reads, and ``Snapshot.ready()`` waits for it before anything
reads the copy.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

_IMMUTABLE = (str, int, float, bool, complex, bytes, type(None), torch.dtype, torch.device)


class Snapshot:
    """``value`` (state dicts) copied now; ``ready()`` returns the copy once every copy has landed."""

    def __init__(self, value: Any) -> None:
        self._storages: dict[tuple[int, torch.device], torch.UntypedStorage] = {}  # copies, by original
        self._on_device = False
        self._value = self._copy(value)
        self._landed: torch.cuda.Event | None = None
        if self._on_device:
            self._landed = torch.cuda.Event()
            self._landed.record()

    def ready(self) -> Any:
        """The copy, once the device has finished writing it (called by the thread that reads it)."""
        if self._landed is not None:
            self._landed.synchronize()
        return self._value

    def _copy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach())
        if type(value) in (dict, OrderedDict):
            return type(value)((key, self._copy(item)) for key, item in value.items())
        if type(value) in (list, tuple):
            return type(value)(self._copy(item) for item in value)
        return value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value)

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a sparse tensor has no single storage
            return tensor.clone()
        if storage.data_ptr() == 0:  # empty: no memory to share
            return tensor.clone()
        key = (storage.data_ptr(), storage.device)
        if key not in self._storages:
            self._storages[key] = self._copy_storage(storage)
        copied = torch.empty(0, dtype=tensor.dtype, device=self._storages[key].device)
        return copied.set_(self._storages[key], tensor.storage_offset(), tensor.size(), tensor.stride())

    def _copy_storage(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        if whole.is_cuda:
            self._on_device = True
            return whole.to("cpu", non_blocking=True).untyped_storage()  # pinned, queued on the current stream
        return whole.clone().untyped_storage()
