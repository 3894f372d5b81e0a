"""The train loss of an epoch, kept on the device and read only when a record is logged."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class LossSum:
    """A sample-weighted sum of batch losses that never syncs the device until read.

    Appending the detached loss to a list costs far less than a tensor op per batch (each ~5 us on
    a tiny model); the list is folded into one tensor every ``fold_every`` batches and when read.
    """

    def __init__(self, start: float, device: torch.device, fold_every: int = 256) -> None:
        self._sum = torch.tensor(start, device=device, dtype=torch.float64)
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._fold_every = fold_every

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self._losses.append(loss)
        self._sizes.append(batch_size)
        if len(self._losses) >= self._fold_every:
            self.total()

    def total(self) -> torch.Tensor:
        if self._losses:
            losses = torch.stack(self._losses).double()
            if len(set(self._sizes)) == 1:  # the usual case: no host-to-device copy of the sizes
                self._sum += losses.sum() * self._sizes[0]
            else:
                self._sum += (losses * torch.tensor(self._sizes, dtype=torch.float64).to(losses.device)).sum()
            self._losses.clear()
            self._sizes.clear()
        return self._sum

    def __float__(self) -> float:
        return self.total().item()  # sync point


class TrainLoss:
    """This process's train loss in the current epoch.

    Three views of it: the epoch's sample-weighted mean (the epoch record, reduced over processes), the
    mean since the last step record (this process's batches only), and the current optimizer step's
    mean over its micro-batches (what ``on_train_step_end`` receives). It is checkpointed per process,
    so a mid-epoch resume continues the same sums.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.epoch = 0
        self._sum = LossSum(0.0, device)
        self.samples = 0
        self.trained = 0  # samples of every epoch this process trained, for throughput; not saved
        self._read_sum, self._read_samples = 0.0, 0  # sum and samples at the last step record
        self.step_loss = torch.zeros((), device=device)
        self._step: list[tuple[torch.Tensor, int]] = []  # this optimizer step's micro-batches, not yet summed
        self._dropped = False

    def begin(self, epoch: int) -> None:
        """Start ``epoch``'s sums, unless they are already that epoch's (a resumed run continues them)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset(0.0, 0)

    def add(self, loss: torch.Tensor, batch_size: int, group_size: int, first_in_group: bool) -> None:
        """One micro-batch's detached (undivided) loss; it joins the sums when its optimizer step ends."""
        self._step.append((loss, batch_size))
        if group_size == 1:
            self.step_loss = loss
        else:
            part = loss / group_size
            self.step_loss = part if first_in_group else self.step_loss + part

    def drop_step(self) -> None:
        """Leave the current optimizer step's micro-batches out of the sums (its loss was not finite)."""
        self._step.clear()
        self._dropped = True

    def end_step(self, loss: torch.Tensor) -> None:
        """Close an optimizer step: its micro-batches join the sums. A loop that added none (a
        ``train_epoch`` of your own) counts the step's loss once, so its step records still carry a loss."""
        counted = bool(self._step)  # a stand-in for a loop that added none is no sample trained
        if not self._step and not self._dropped:
            self.add(loss.detach(), 1, 1, first_in_group=True)
        for micro_batch_loss, batch_size in self._step:
            self._sum.add(micro_batch_loss, batch_size)
            self.samples += batch_size
            self.trained += batch_size if counted else 0
        self._step.clear()
        self._dropped = False

    def mean_since_last_read(self) -> float:
        """Mean loss of this process's samples since the previous call (one device sync)."""
        total = float(self._sum)
        mean = (total - self._read_sum) / max(self.samples - self._read_samples, 1)
        self._read_sum, self._read_samples = total, self.samples
        return mean

    def epoch_mean(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """The epoch's mean over all processes' samples; ``reduce`` sums a tensor across processes (one sync)."""
        both = torch.stack([self._sum.total(), torch.tensor(float(self.samples), device=self._device,
                                                             dtype=torch.float64)])
        both = reduce(both)
        return (both[0] / both[1].clamp(min=1)).item()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "sum": float(self._sum), "samples": self.samples,
                "read_sum": self._read_sum, "read_samples": self._read_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._reset(float(state["sum"]), int(state["samples"]))
        self._read_sum, self._read_samples = float(state["read_sum"]), int(state["read_samples"])

    def merged_state_dict(self, states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
        """The state for process ``rank`` of a run resumed with another process count from ``states`` (one per
        process that saved): the first process carries every process's sums, so the epoch's mean, summed over
        processes, still covers the whole epoch; the others start from zero."""
        total = sum(float(s["sum"]) for s in states) if rank == 0 else 0.0
        samples = sum(int(s["samples"]) for s in states) if rank == 0 else 0
        return {"epoch": states[0]["epoch"], "sum": total, "samples": samples, "read_sum": total, "read_samples": samples}

    def _reset(self, total: float, samples: int) -> None:
        self._sum = LossSum(total, self._device)
        self.samples = samples
        self._read_sum, self._read_samples = total, samples
