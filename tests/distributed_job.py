"""Two-process digits run for tests/test_distributed.py: ``torchrun --nproc_per_node 2 -m tests.distributed_job OUT``.

Trains, then evaluates and predicts the test split; rank 0 writes what it saw to OUT.
"""
from __future__ import annotations

import json
import pathlib
import sys

import torch

from phasetrain import Trainer
from tests.conftest import digits, digits_config


def main() -> None:
    torch.set_num_threads(1)
    out = pathlib.Path(sys.argv[1])
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
