"""Checks that run before training, so a mismatch stops the run with one message instead of mid-epoch."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from phasetrain.batches import unpack_batch
from phasetrain.errors import DataError
from phasetrain.rng import preserved_rng


def check_model_fits_loss(model: torch.nn.Module, loss_fn: Any, batch: Any) -> None:
    """Run a small batch of train samples through ``model`` and ``loss_fn`` (eval mode, no grad, RNG untouched).

    A mismatch (wrong output width, wrong target type, non-scalar loss) raises a DataError naming the
    model, the loss and the shapes.
    """
    inputs, targets = unpack_batch(batch)
    unwrapped = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    model_name = type(unwrapped).__name__
    loss_name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    with dry_run(model):
        try:
            outputs = model(inputs)
        except Exception as exc:
            raise DataError(f"model {model_name} cannot run on a batch of train inputs {describe(inputs)}: "
                            f"{type(exc).__name__}: {exc}") from exc
        try:
            loss = loss_fn(outputs, targets)
        except Exception as exc:
            raise DataError(f"model output does not fit the loss: {model_name} gives {describe(outputs)}, "
                            f"targets are {describe(targets)}, and {loss_name} raised "
                            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise DataError(f"loss {loss_name} must return a scalar tensor, got {describe(loss)} "
                        "(use reduction='mean' or 'sum')")


def check_loss_step(step: Callable[[Any], Any], model: torch.nn.Module, batch: Any, owner: str) -> None:
    """Run an overridden ``calculate_eval_batch_loss`` on a small batch: custom batch formats are checked
    by the user's own code. ``owner`` names the trainer class in messages."""
    with dry_run(model):
        try:
            output = step(batch)
        except Exception as exc:
            raise DataError(f"{owner}.calculate_eval_batch_loss failed on a batch of 2 train samples: "
                            f"{type(exc).__name__}: {exc}") from exc
    loss = output.get("loss") if isinstance(output, dict) else None
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise DataError(f"{owner}.calculate_eval_batch_loss must return a dict with a scalar 'loss' tensor, "
                        f"'model_outputs' and 'batch_size'; got {describe(output)}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a block, then back to the mode the model was in (a callback may evaluate mid-epoch)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def dry_run(model: torch.nn.Module) -> Iterator[None]:
    """No gradients, eval mode (dropout draws nothing), and every RNG exactly as before afterwards."""
    with preserved_rng(), torch.no_grad(), eval_mode(model):
        yield


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
