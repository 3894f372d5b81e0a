"""pytorch-accelerated's ``TrainerRunConfig``: the numbers of the current training run, read by callbacks."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainerRunConfig:
    """Set by ``Trainer.train()``/``evaluate()``. ``num_update_steps_per_epoch`` is the number of optimizer
    steps each process takes per epoch (pytorch-accelerated counted the batches of all processes here,
    which every process's scheduler then stepped through only 1/N of); the two update counts are equal."""

    num_epochs: int
    train_per_device_batch_size: int
    train_dl_kwargs: dict[str, Any]
    eval_per_device_batch_size: int
    eval_dl_kwargs: dict[str, Any]
    gradient_accumulation_steps: int
    gradient_clip_value: float | None
    train_total_batch_size: int
    eval_total_batch_size: int
    num_update_steps_per_epoch: int
    num_local_update_steps_per_epoch: int
    max_num_train_steps: int | None
    is_local_process_zero: bool
    is_world_process_zero: bool
    is_distributed: bool
    mixed_precision: str
    num_processes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
