"""A copy of state dicts that training may go on changing: what a background checkpoint writes.

Tensors are copied and containers rebuilt; numbers and strings are immutable and kept as they are.
A CUDA tensor is copied to pinned host memory without waiting for the device (a device copy would hold
the model and optimizer state a second time in GPU memory): the copy is queued on the current stream,
so the optimizer steps queued after it cannot change what it reads, and ``Snapshot.ready()`` waits for it
before anything reads the copy. Other tensors are cloned where they are.
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
        self._copies: dict[tuple[Any, ...], torch.Tensor] = {}
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
            key = _view_of(value)  # tensors that are one view of one memory (tied weights) stay one tensor
            if key not in self._copies:
                self._copies[key] = self._copy_tensor(value.detach())
            return self._copies[key]
        if type(value) in (dict, OrderedDict):
            return type(value)((key, self._copy(item)) for key, item in value.items())
        if type(value) in (list, tuple):
            return type(value)(self._copy(item) for item in value)
        return value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value)

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda:
            self._on_device = True
            return tensor.to("cpu", non_blocking=True)  # into pinned memory, queued on the current stream
        return tensor.clone()


def _view_of(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same view of the same memory."""
    try:
        storage = tensor.untyped_storage().data_ptr()
    except RuntimeError:  # a sparse tensor has no single storage
        return ("object", id(tensor))
    if storage == 0:  # empty tensors have no memory to share
        return ("object", id(tensor))
    return (storage, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
