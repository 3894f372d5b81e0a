"""pytorch-accelerated's ``CosineLrScheduler``: warmup, cosine annealing with k-decay, then cooldown.

The lrs it sets are pytorch-accelerated 0.1's to the last bit (tests/test_schedulers.py compares them),
quirks included, so a ported run trains the same; they are listed on the class.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from phasetrain.compat.schedulers.scheduler_base import StatefulSchedulerBase


class CosineLrScheduler(StatefulSchedulerBase):
    """Cosine annealing (https://arxiv.org/abs/1608.03983, no restarts) with optional linear warmup,
    a k-decay exponent (https://arxiv.org/abs/2004.05909) and a cooldown held at the minimum lr.

    Call ``step()`` after every optimizer update. After ``n`` updates (``step()`` called ``n + 1`` times),
    with ``W``, ``C``, ``T`` the warmup, cooldown and total updates (epochs times
    ``num_update_steps_per_epoch``), a group whose initial lr is ``b`` gets::

        start + n * (b - warmup_starting_lr) / W                          for n < W
        low + 0.5 * (b - low) * (1 + cos(pi * (n - W)**k / (T - W - C)**k))   for W <= n < T - W - C
        low                                                               after that, for good

    where ``low`` is ``min_lr_ratio * b`` if given, else ``lr_min``, and ``start`` is
    ``warmup_starting_lr_ratio * b`` if given, else ``warmup_starting_lr``. Before the first ``step()``
    the lr is ``warmup_starting_lr`` when there is a warmup, else ``b``.

    pytorch-accelerated's quirks, kept so the numbers match: the warmup slope uses ``warmup_starting_lr``
    even when ``warmup_starting_lr_ratio`` is given (the warmup then ends near ``(1 + ratio) * b``, and the
    lr before the first step is ``warmup_starting_lr``, not the ratio's); and the cosine ends ``W`` updates
    early, at ``T - W - C``, without quite reaching ``low`` (it then drops to it).

    In a phasetrain config (stepped after every update, as ``interval: step`` does)::

        scheduler:
          target: phasetrain.compat.schedulers:CosineLrScheduler
          args: {total_num_epochs: "{epochs}", num_update_steps_per_epoch: "{steps_per_epoch}", num_warmup_epochs: 1}
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_epochs: int, num_update_steps_per_epoch: int,
                 k_decay: float = 1.0, lr_min: float = 1e-6, min_lr_ratio: float | None = None,
                 num_warmup_epochs: int = 0, warmup_starting_lr: float = 1e-6,
                 warmup_starting_lr_ratio: float | None = None, num_cooldown_epochs: int = 0) -> None:
        super().__init__(optimizer)
        if not (total_num_epochs > 0 and num_update_steps_per_epoch > 0):
            raise ValueError("CosineLrScheduler: total_num_epochs and num_update_steps_per_epoch must be > 0, got "
                             f"{total_num_epochs} and {num_update_steps_per_epoch}")
        if not lr_min >= 0:
            raise ValueError(f"CosineLrScheduler: lr_min must be >= 0, got {lr_min}")
        # The attribute names are pytorch-accelerated's: user code reads them, and its state dict names them.
        self.total_iterations = total_num_epochs * num_update_steps_per_epoch
        self.warmup_iterations = num_warmup_epochs * num_update_steps_per_epoch
        self.num_cooldown_iterations = num_cooldown_epochs * num_update_steps_per_epoch
        self.lr_min, self.lr_min_ratio = lr_min, min_lr_ratio
        self.warmup_lr_init, self.warmup_lr_ratio = warmup_starting_lr, warmup_starting_lr_ratio
        self.k_decay = k_decay
        if self.warmup_iterations:
            self._update_param_groups(self.warmup_lr_init)

    def get_updated_values(self, num_updates: int) -> list[float]:
        """Each group's lr after ``num_updates`` updates (the class docstring gives the formula)."""
        if num_updates < self.warmup_iterations:
            return [self._warmup_lr(base_lr, num_updates) for base_lr in self.base_lr_values]
        cosine_iterations = self.total_iterations - self.warmup_iterations - self.num_cooldown_iterations
        if num_updates < cosine_iterations:
            return [self._cosine_lr(base_lr, num_updates - self.warmup_iterations, cosine_iterations)
                    for base_lr in self.base_lr_values]
        return [self._lowest_lr(base_lr) for base_lr in self.base_lr_values]

    def _warmup_lr(self, base_lr: float, num_updates: int) -> float:
        start = self.warmup_lr_init if self.warmup_lr_ratio is None else self.warmup_lr_ratio * base_lr
        return start + num_updates * ((base_lr - self.warmup_lr_init) / self.warmup_iterations)

    def _cosine_lr(self, base_lr: float, done: int, span: int) -> float:
        low = self._lowest_lr(base_lr)
        return low + 0.5 * (base_lr - low) * (1 + math.cos(math.pi * done**self.k_decay / span**self.k_decay))

    def _lowest_lr(self, base_lr: float) -> float:
        return self.lr_min if self.lr_min_ratio is None else self.lr_min_ratio * base_lr

    @classmethod
    def create_scheduler_fn(cls, total_num_epochs: Any = None, num_update_steps_per_epoch: Any = None,
                            k_decay: float = 1.0, lr_min: float = 1e-6, min_lr_ratio: float | None = None,
                            num_warmup_epochs: int = 0, warmup_starting_lr: float = 1e-6,
                            warmup_starting_lr_ratio: float | None = None,
                            num_cooldown_epochs: int = 0) -> partial[CosineLrScheduler]:
        """A function of the optimizer that builds this scheduler, for ``create_scheduler_fn`` of the
        compat Trainer::

            trainer.train(train_dataset=train_dataset, num_epochs=num_epochs, per_device_batch_size=32,
                          create_scheduler_fn=CosineLrScheduler.create_scheduler_fn(num_warmup_epochs=5))

        ``total_num_epochs`` and ``num_update_steps_per_epoch`` left out are the Trainer's placeholders
        ``NUM_EPOCHS`` and ``NUM_UPDATE_STEPS_PER_EPOCH``, which it replaces with the run's numbers.
        """
        from phasetrain.compat.trainer import TrainerPlaceholderValues  # the compat Trainer imports this module

        if total_num_epochs is None:
            total_num_epochs = TrainerPlaceholderValues.NUM_EPOCHS
        if num_update_steps_per_epoch is None:
            num_update_steps_per_epoch = TrainerPlaceholderValues.NUM_UPDATE_STEPS_PER_EPOCH
        return partial(cls, total_num_epochs=total_num_epochs, num_update_steps_per_epoch=num_update_steps_per_epoch,
                       lr_min=lr_min, min_lr_ratio=min_lr_ratio, k_decay=k_decay, num_warmup_epochs=num_warmup_epochs,
                       warmup_starting_lr=warmup_starting_lr, warmup_starting_lr_ratio=warmup_starting_lr_ratio,
                       num_cooldown_epochs=num_cooldown_epochs)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's numbers and the update count, under pytorch-accelerated's keys."""
        return {"total_iterations": self.total_iterations, "lr_min_ratio": self.lr_min_ratio, "lr_min": self.lr_min,
                "warmup_iterations": self.warmup_iterations, "warmup_lr_init": self.warmup_lr_init,
                "warmup_lr_ratio": self.warmup_lr_ratio, "k_decay": self.k_decay,
                "num_cooldown_iterations": self.num_cooldown_iterations, "num_updates": self._num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = ("total_iterations", "lr_min_ratio", "lr_min", "warmup_iterations", "warmup_lr_init",
                "warmup_lr_ratio", "k_decay", "num_cooldown_iterations")
        for key in keys:
            setattr(self, key, state_dict[key])
        self._num_updates = state_dict["num_updates"]
