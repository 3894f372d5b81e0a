"""pytorch-accelerated's scheduler bases: a scheduler that sets a param-group field from the update count.

Unlike a torch scheduler, these are meant to be called after every optimizer update, and the value
they set is a function of how many updates have been done, nothing else: ``SchedulerBase`` is told
that number (``step_update(num_updates)``), ``StatefulSchedulerBase`` counts it (``step()``).
Behaviour, names and state dicts are pytorch-accelerated 0.1's, so code and checkpoints written for
it work here unchanged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from numbers import Number
from typing import Any

import torch

ScheduledValues = Number | float | Iterable[Number | float] | None


class SchedulerBase(ABC):
    """Sets ``param_group_field`` (the lr by default) of every param group of ``optimizer`` to the
    values ``get_updated_values(num_updates)`` returns.

    Each group's starting value is kept under ``"initial_<field>"`` in the group (one already there, as
    a torch scheduler leaves it, is kept) and in ``base_lr_values``; building the scheduler sets the
    field back to it. Example, with the update count kept by the loop::

        for epoch in range(num_epochs):
            num_updates = epoch * num_update_steps_per_epoch
            for inputs, targets in train_dataloader:
                loss_func(model(inputs), targets).backward()
                optimizer.step()
                optimizer.zero_grad()
                num_updates += 1
                scheduler.step_update(num_updates)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, param_group_field: str = "lr") -> None:
        self.optimizer = optimizer
        self.param_group_field = param_group_field
        self._initial_param_group_field = f"initial_{param_group_field}"
        self._store_initial_lrs()
        self.base_lr_values = [group[self._initial_param_group_field] for group in optimizer.param_groups]
        self._update_param_groups(self.base_lr_values)

    def _store_initial_lrs(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if self.param_group_field not in group:
                raise KeyError(f"{self.param_group_field} missing from param_groups[{index}]: the scheduler "
                               f"sets the field {self.param_group_field!r}, which every param group must have")
            group.setdefault(self._initial_param_group_field, group[self.param_group_field])

    @abstractmethod
    def get_updated_values(self, num_updates: int) -> ScheduledValues:
        """The field's value after ``num_updates`` optimizer updates: one number for every group, a list
        or tuple with one per group, or None to leave the groups as they are."""

    def step_update(self, num_updates: int) -> None:
        """Set the field of every group to its value after ``num_updates`` updates."""
        values = self.get_updated_values(num_updates)
        if values is not None:
            self._update_param_groups(values)

    def _update_param_groups(self, values: Any) -> None:
        # Only a list or a tuple is one value per group; anything else is the value of every group.
        per_group = values if isinstance(values, list | tuple) else [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, per_group, strict=False):
            group[self.param_group_field] = value

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer (which is saved on its own)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)


class StatefulSchedulerBase(SchedulerBase, ABC):
    """A ``SchedulerBase`` that counts the updates itself: call ``step()`` once after every optimizer update.

    The count starts at -1, so the first ``step()`` sets the values for ``num_updates == 0``. A subclass
    says what its state is (``state_dict``/``load_state_dict``), the count included.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, param_group_field: str = "lr") -> None:
        super().__init__(optimizer, param_group_field=param_group_field)
        self._num_updates = -1

    def step(self) -> None:
        self._num_updates += 1
        self.step_update(self._num_updates)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @abstractmethod
    def load_state_dict(self, scheduler_state_dict: dict[str, Any]) -> None:
        raise NotImplementedError
