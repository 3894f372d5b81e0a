"""EMA: an exponential moving average of the model's weights, kept beside the training, evaluated and saved.

After every ``every_steps``-th optimizer step each averaged tensor moves ``1 - decay`` of the way to the
model's: ``ema = decay * ema + (1 - decay) * weight``. The average is part of every checkpoint (the
callback's state), so a resume continues it bit for bit. After each eval epoch the average is evaluated
too (``eval_ema/loss``, ``eval_ema/<metric>``), at the end on the test split if there is one
(``test_ema/...``), and ``RUN_DIR/ema.safetensors`` is written beside ``model.safetensors``.

In a config::

    callbacks:
      - {target: "phasetrain.ema:EMA", args: {decay: 0.999}}

From Python::

    ema = EMA(decay=0.999)
    trainer = Trainer(config, callbacks=[ema])
    trainer.run()
    with ema.applied():  # the model holds the averaged weights inside the block
        trainer.evaluate(test_set)

``decay`` sets how many recent updates the average spans, about ``1 / (1 - decay)`` of them (0.999: the
last ~1,000); a run of far fewer updates than that averages mostly its initial weights.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from phasetrain.accelerator import bare_model
from phasetrain.callbacks import Callback
from phasetrain.errors import CheckpointError
from phasetrain.phases import prefixed

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer


class EMA(Callback):
    """An exponential moving average of the model's parameters (buffers, such as BatchNorm's running
    statistics, are copied as they are), updated after every ``every_steps``-th optimizer step.

    The average is kept on the model's device, in the parameters' dtype. ``evaluate``: also evaluate
    the average after each eval epoch and on the test split at the end (one more pass over each).
    """

    #: The record prefixes it logs (``eval_ema/loss``, ...), so ``checkpoint.monitor`` may name them.
    records = ("eval_ema", "test_ema")

    def __init__(self, decay: float = 0.999, every_steps: int = 1, evaluate: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1 (0.999 keeps ~1,000 steps), got {decay!r}")
        if every_steps < 1:
            raise ValueError(f"EMA every_steps must be a whole number >= 1, got {every_steps!r}")
        self.decay, self.every_steps, self.evaluate = decay, every_steps, evaluate
        self._names: list[str] = []  # parameters then buffers, as named_parameters/named_buffers name them
        self._live: list[torch.Tensor] = []  # the model's tensors, in the same order
        self._average: list[torch.Tensor] = []  # the EMA tensors
        self._params = 0  # how many of the tensors are parameters (averaged); the rest are buffers (copied)
        self._pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (averages, live) per kind
        self._restored: dict[str, torch.Tensor] | None = None

    # ---- the run ----------------------------------------------------------------------------------
    def on_run_start(self, trainer: Trainer) -> None:
        policy = trainer.config.checkpoint
        if policy.keep_best and policy.monitor.split("/")[0] in self.records and trainer.accelerator.is_main_process:
            warnings.warn(f"checkpoint.monitor {policy.monitor!r} ranks checkpoints by the averaged weights, but "
                          "best.safetensors holds the model's own weights of the best checkpoint; the averaged "
                          "ones are in that checkpoint's EMA state and, at the end, in ema.safetensors", stacklevel=2)
        model = bare_model(trainer.accelerator, trainer.model)
        params, buffers = list(model.named_parameters()), list(model.named_buffers())
        self._names = [name for name, _ in params + buffers]
        self._live = [tensor.detach() for _, tensor in params + buffers]
        self._params = len(params)
        self._average = [tensor.clone() for tensor in self._live]  # a fresh run averages from its initial weights
        split = self._params
        # Sliced once here, not per step: (parameters, buffers), each (averages, the model's tensors).
        self._pairs = [(self._average[:split], self._live[:split]), (self._average[split:], self._live[split:])]
        if self._restored is not None:
            self._load_average(self._restored)
            self._restored = None
        elif trainer.state.resumed:
            warnings.warn("EMA: the checkpoint holds no EMA weights (it was written without the EMA callback); "
                          "the average starts again from the resumed weights", stacklevel=2)

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step % self.every_steps:
            return
        (params, live_params), (buffers, live_buffers) = self._pairs
        # One fused kernel per device and dtype for all the parameters, not one per tensor.
        with torch.no_grad():
            if params:
                torch._foreach_lerp_(params, live_params, 1.0 - self.decay)
            if buffers:
                torch._foreach_copy_(buffers, live_buffers)

    def on_exit_eval_epoch(self, trainer: Trainer) -> None:
        if self.evaluate and trainer.data.eval is not None:
            self._evaluate(trainer, trainer.data.eval, "eval_ema")

    def on_enter_done(self, trainer: Trainer) -> None:
        # Before the done phase writes model.safetensors: a folder with that file counts as finished, so
        # a crash in between must leave the run resumable, not finished without its ema.safetensors.
        if self.evaluate and trainer.data.test is not None:
            self._evaluate(trainer, trainer.data.test, "test_ema")
        with self.applied():
            trainer.run_folder.write_weights(trainer.accelerator, trainer.model, trainer.run_folder.ema_weights)

    def _evaluate(self, trainer: Trainer, dataset: Any, prefix: str) -> None:
        with self.applied():
            results = trainer.evaluate(dataset)
        trainer.log(prefixed(prefix, results))

    # ---- the average --------------------------------------------------------------------------------
    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again, bit for bit.

        Costs one copy of the weights in memory while it lasts. Every process must enter it (an
        evaluation inside syncs them).
        """
        if not self._live:
            raise RuntimeError("EMA.applied(): the average exists once the run has started (trainer.run())")
        own = [tensor.clone() for tensor in self._live]
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, own)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter and buffer name (the tensors themselves, not copies)."""
        return dict(zip(self._names, self._average, strict=True))

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The tensors themselves: a checkpoint copies them before the next step changes them (phasetrain.snapshot),
        # or, not written in the background, writes them before it.
        return {"average": self.weights()} if self._average else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A resume loads callbacks before on_run_start binds the model's tensors: kept until then.
        self._restored = state.get("average")

    def _load_average(self, saved: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self._names if name not in saved]
        unexpected = [name for name in saved if name not in self._names]
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint's EMA weights do not match the model: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, average in zip(self._names, self._average, strict=True):
                average.copy_(saved[name])  # from the CPU to the model's device, exactly
