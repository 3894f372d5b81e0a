"""Checks that run before training, so a mismatch stops the run with one message instead of mid-epoch."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset

from phasetrain.errors import DataError
from phasetrain.phases import unpack_batch
from phasetrain.rng import preserved_rng

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer


def check_model_fits_loss(trainer: Trainer) -> None:
    """Run two train samples through model and loss (eval mode, no grad, RNG untouched).

    A mismatch (wrong output width, wrong target type, non-scalar loss) stops the run with a message
    naming the model, the loss and the shapes. When a loss step is overridden, that step is what runs,
    so custom batch formats are checked by the user's own code.
    """
    from phasetrain.trainer import Trainer
    data = trainer.train_data
    if isinstance(data, IterableDataset):
        return
    batch = trainer.to_device(torch.utils.data.default_collate([data[i] for i in range(min(2, len(data)))]))
    cls = type(trainer)
    if (cls.calculate_eval_batch_loss is not Trainer.calculate_eval_batch_loss
            or cls.calculate_train_batch_loss is not Trainer.calculate_train_batch_loss):
        _check_overridden_step(trainer, batch)
        return
    inputs, targets = unpack_batch(batch)
    model_name = type(trainer.accelerator.unwrap_model(trainer.model)).__name__
    loss_name = getattr(trainer.loss_fn, "__name__", type(trainer.loss_fn).__name__)
    with _dry_run(trainer.model):
        try:
            outputs = trainer.model(inputs)
        except Exception as exc:
            raise DataError(f"model {model_name} cannot run on a batch of train inputs {describe(inputs)}: "
                            f"{type(exc).__name__}: {exc}") from exc
        try:
            loss = trainer.loss_fn(outputs, targets)
        except Exception as exc:
            raise DataError(f"model output does not fit the loss: {model_name} gives {describe(outputs)}, "
                            f"targets are {describe(targets)}, and {loss_name} raised "
                            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise DataError(f"loss {loss_name} must return a scalar tensor, got {describe(loss)} "
                        "(use reduction='mean' or 'sum')")


def _check_overridden_step(trainer: Trainer, batch: Any) -> None:
    name = type(trainer).__name__
    with _dry_run(trainer.model):
        try:
            output = trainer.calculate_eval_batch_loss(batch)
        except Exception as exc:
            raise DataError(f"{name}.calculate_eval_batch_loss failed on a batch of 2 train samples: "
                            f"{type(exc).__name__}: {exc}") from exc
    loss = output.get("loss") if isinstance(output, dict) else None
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise DataError(f"{name}.calculate_eval_batch_loss must return a dict with a scalar 'loss' tensor, "
                        f"'model_outputs' and 'batch_size'; got {describe(output)}")


@contextlib.contextmanager
def _dry_run(model: torch.nn.Module) -> Iterator[None]:
    """No gradients, eval mode (dropout draws nothing), and every RNG exactly as before afterwards."""
    from phasetrain.trainer import eval_mode
    with preserved_rng(), torch.no_grad(), eval_mode(model):
        yield


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
