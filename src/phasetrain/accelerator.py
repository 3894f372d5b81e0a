"""The run's ``accelerate.Accelerator``, and the measured places where phasetrain goes around its wrappers."""
from __future__ import annotations

import atexit
import pathlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration

from phasetrain.errors import ConfigError, LaunchError
from phasetrain.launch import check_srun_without_launcher, launched_processes


def make_accelerator(mixed_precision: str, trackers: Sequence[str] = (), logging_dir: pathlib.Path | None = None
                     ) -> Accelerator:
    """An Accelerator with this run's precision and trackers (``logging_dir`` holds what those that write
    files write), for the processes the launcher started.

    accelerate keeps one process-wide state and refuses a second precision. In a single process nothing
    else depends on that state, so it is reset; in a distributed run the launch decides and it is kept.
    """
    from accelerate.state import AcceleratorState
    check_srun_without_launcher()
    launched = launched_processes()  # before accelerate: with MPI it writes WORLD_SIZE itself
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and process_state().num_processes == 1:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=_cpu_launch(), log_with=list(trackers) or None,
                              project_config=ProjectConfiguration(logging_dir=str(logging_dir)) if trackers else None)
    check_launch(launched, accelerator.num_processes, str(accelerator.distributed_type))
    refuse_sharding(accelerator.distributed_type)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision: 'fp16' needs a GPU (on the CPU it would silently do nothing); "
                          "use 'bf16' or 'no'")
    return accelerator


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside ``model``, without the DDP, mixed-precision or ``torch.compile`` wrappers: the one
    whose state dict is saved and loaded (a compiled module's would prefix every key with ``_orig_mod.``)."""
    bare: torch.nn.Module = accelerator.unwrap_model(model, keep_torch_compile=False)
    return bare


def process_state() -> Any:
    """accelerate's ``PartialState`` (rank, process count, barriers) as this launch needs it: the first
    call in a process decides it for every later one, so phasetrain never asks for it any other way."""
    from accelerate.state import PartialState
    return PartialState(cpu=_cpu_launch())


def _cpu_launch() -> bool:
    """Whether this process belongs to a multi-process launch on a machine without an accelerator (GPU).

    accelerate takes such a process for a single one unless told ``cpu=True`` (or ACCELERATE_USE_CPU):
    under ``torchrun --nproc_per_node 2`` on a CPU machine every process would then train alone and all
    would write the same run folder. Told, it joins them with gloo.
    """
    return launched_processes() > 1 and torch.accelerator.current_accelerator() is None


def check_launch(launched: int, seen: int, distributed_type: str) -> None:
    """Refuse a process that the launcher started as one of ``launched`` but accelerate counts as one of ``seen``:
    it would train on its own and write over the others' run folder."""
    if launched > 1 and seen != launched:
        raise LaunchError(
            f"this process was launched as one of {launched} (WORLD_SIZE={launched}), but accelerate sees "
            f"{seen} process{'es' if seen != 1 else ''} ({distributed_type}); it would train alone and share the "
            "run folder with the others. Launch with 'torchrun --nproc_per_node N', 'phasetrain run CONFIG "
            "--num-processes N' or 'accelerate launch --multi_gpu', and unset ACCELERATE_* variables left from "
            "another setup (see docs/distributed.md)")


#: Launches in which each process holds a shard of the model or optimizer state, not all of it.
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def refuse_sharding(distributed_type: DistributedType) -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM launches: phasetrain's checkpoints and final weights hold what the
    main process holds, which under those is one shard (see docs/distributed.md, "Sharded models")."""
    if distributed_type in SHARDED:
        raise LaunchError(f"this launch shards the model across processes ({distributed_type.value}), and "
                          "phasetrain's checkpoints would hold one shard only: launch without FSDP/DeepSpeed "
                          "(plain data parallelism: 'accelerate launch --multi_gpu' or torchrun), or see "
                          "docs/distributed.md")


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

    def release_if_alive() -> None:
        alive = ref()
        if alive is not None:
            release(alive)

    atexit.register(release_if_alive)


def release(trainer: Any) -> None:
    """Let go of DDP and destroy the process group now (see ``release_at_exit``): for a trainer that is done
    with, when the process does not end with it (``phasetrain evaluate`` drops its trainer long before)."""
    trainer.model = bare_model(trainer.accelerator, trainer.model)
    trainer.accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    trainer.accelerator.end_training()  # destroys the process group
