"""Two-process digits runs for tests/test_distributed.py, under torchrun:

    torchrun --nproc_per_node 2 -m tests.distributed_job OUT                  train, evaluate, predict
    torchrun --nproc_per_node 2 -m tests.distributed_job OUT resume-test N    crash at step N (0: resume)
    torchrun --nproc_per_node 2 -m tests.distributed_job OUT nan-test MODE    NaN inputs on one process only
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import torch

from phasetrain import Callback, Trainer
from tests.conftest import digits, digits_config


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.state.optimizer_step == self.step:
            raise SystemExit(3)


def resume_test(out: pathlib.Path, crash_step: int) -> None:
    """Dropout, shuffling, accumulation and mid-epoch checkpoints across two processes."""
    config = digits_config(out / "run", model={"args": {"hidden": 64, "dropout": 0.3}},
                           train={"epochs": 2, "grad_accum_steps": 2},
                           checkpoint={"every_epochs": 1, "every_steps": 4, "keep_last": 1})
    trainer = Trainer(config, callbacks=[CrashAt(crash_step)] if crash_step else [])
    trainer.run(resume="latest" if crash_step == 0 else None)


class NaNOnFirstProcess(torch.utils.data.Dataset[Any]):
    """The digits train split with a NaN input at index 0, which only the first process's shard holds."""

    def __len__(self) -> int:
        return len(digits()["train"])  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        x, y = digits()["train"][index]
        return (x * float("nan") if index == 0 else x), y


def nan_test(out: pathlib.Path, mode: str) -> None:
    """A NaN loss on one process: both must skip (or stop at) the same step, or the weights go NaN."""
    config = digits_config(out / "run", train={"epochs": 1, "shuffle": False, "nonfinite_loss": mode})
    Trainer(config, train_data=NaNOnFirstProcess()).run()


def main() -> None:
    torch.set_num_threads(1)
    out = pathlib.Path(sys.argv[1])
    if len(sys.argv) > 2:
        if sys.argv[2] == "nan-test":
            nan_test(out, sys.argv[3])
        else:
            resume_test(out, int(sys.argv[3]))
        return
    trainer = Trainer(digits_config(out / "run", train={"epochs": 3}, checkpoint={"every_epochs": 3}))
    history = trainer.run()
    results = trainer.evaluate(digits()["test"])
    predictions = trainer.predict(digits()["test"])
    if trainer.accelerator.is_main_process:
        torch.save(predictions, out / "predictions.pt")
        (out / "results.json").write_text(json.dumps({
            "processes": trainer.accelerator.num_processes, "evaluate": results,
            "history": history.state_dict(), "steps": trainer.state.optimizer_step}))


if __name__ == "__main__":
    main()
