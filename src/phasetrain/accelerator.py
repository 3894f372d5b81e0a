"""The run's ``accelerate.Accelerator``, and the measured places where phasetrain goes around its wrappers."""
from __future__ import annotations

import atexit
import weakref
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from phasetrain.errors import ConfigError


def make_accelerator(mixed_precision: str) -> Accelerator:
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


def direct_steps(accelerator: Accelerator) -> bool:
    """Whether backward and the optimizer calls can skip accelerate's wrappers.

    Without a grad scaler, DeepSpeed, Megatron or XLA, ``AcceleratedOptimizer.step``/``zero_grad`` and
    ``Accelerator.backward`` only forward to the optimizer and ``loss.backward()``, after a package
    lookup, a signature inspection and a ``loss / 1`` per call (~10% on a tiny MLP). Go direct then;
    keep accelerate's path wherever it does real work.
    """
    special = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
    return accelerator.scaler is None and accelerator.distributed_type not in special


def gather_in_order(local: Any, size: int, world_size: int) -> torch.Tensor:
    """Every process's predictions, back in dataset order.

    Eval shards are ``rank::world_size``, so rank r holds samples r, r+W, r+2W, ...: interleave them.
    """
    import torch.distributed as dist
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, local)
    result = torch.empty((size, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        result[rank::world_size] = part
    return result


def release_at_exit(trainer: Any) -> None:
    """At interpreter exit, let go of DDP and destroy the process group, while Python is still whole.

    DDP's reducer keeps gloo work objects alive; collected during interpreter finalization they abort
    the process ("terminate called without an active exception", SIGABRT) after a finished run, in
    about one run in six here. Destroying the process group only helps once DDP itself is gone.
    """
    ref = weakref.ref(trainer)

    def release() -> None:
        alive = ref()
        if alive is None:
            return
        alive.model = alive.accelerator.unwrap_model(alive.model)
        alive.accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
        alive.accelerator.end_training()  # destroys the process group

    atexit.register(release)
