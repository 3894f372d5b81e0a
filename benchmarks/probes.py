"""The children of benchmarks/run.py's extra figures that time phasetrain alone, one figure a process.

    python -m benchmarks.probes checkpoint-save --out result.json
    python -m benchmarks.probes interrupted --run-dir DIR --out result.json   # then:
    python -m benchmarks.probes resume --run-dir DIR --out result.json

- ``checkpoint-save``: the heavy workload with ``checkpoint.every_epochs: 0``; after each of two epochs a
  callback takes a checkpoint (``save_checkpoint()``, the blocking part; then ``wait_for_checkpoints()``, the
  total) and a bare ``torch.save`` of the same state. The second epoch's figures are reported: the first save
  of a process also pays one-time costs (imports, a writer starting).
- ``interrupted``: the tiny workload with the defaults (a checkpoint every epoch), sent SIGTERM after the
  middle step of its second epoch, as a preempted job is; it checkpoints there and stops. Reports the time
  from the start of ``run()`` to the end of the first optimizer step (a fresh start).
- ``resume``: a fresh ``Trainer(config).run(resume="latest")`` of that run folder; reports the time from the
  start of ``run()`` (finding, verifying and loading the checkpoint, skipping the consumed batches by index)
  to the end of its first optimizer step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time
from typing import Any

import torch

from benchmarks.phasetrain_callbacks import FirstStepTimer, SaveTimer
from benchmarks.workloads import WORKLOADS, Workload
from phasetrain import RunConfig, RunInterrupted, Trainer

RESUME_EPOCHS = 3


def config(workload: Workload, run_dir: pathlib.Path, epochs: int, checkpoint: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict({
        "run_dir": str(run_dir), "seed": 0,
        "model": {"target": workload.model},
        "loss": "torch.nn:CrossEntropyLoss",
        "optimizer": {"target": "torch.optim:SGD", "args": {"lr": workload.lr}},
        "train": {"epochs": epochs, "batch_size": workload.batch_size},
        "checkpoint": checkpoint,
    })


def checkpoint_save(workload: Workload) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="phasetrain-bench-save-") as scratch:
        timer = SaveTimer(pathlib.Path(scratch))
        cfg = config(workload, pathlib.Path(scratch) / "run", epochs=2, checkpoint={"every_epochs": 0})
        trainer = Trainer(cfg, train_data=workload.dataset(), callbacks=[timer])
        trainer.run()
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        megabytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values()) / 2**20
    return {"blocking_s": timer.blocking[-1], "total_s": timer.total[-1], "bare_torch_save_s": timer.bare[-1],
            "model_megabytes": megabytes}


def interrupted(workload: Workload, run_dir: pathlib.Path) -> dict[str, Any]:
    steps = workload.steps_per_epoch
    timer = FirstStepTimer(interrupt_at_step=steps + steps // 2)
    trainer = Trainer(config(workload, run_dir, RESUME_EPOCHS, {}), train_data=workload.dataset(), callbacks=[timer])
    start = time.perf_counter()
    try:
        trainer.run()
    except RunInterrupted:
        pass
    else:
        raise SystemExit("the run was not interrupted: it has nothing to resume")
    assert timer.first_step is not None
    return {"to_first_step_s": timer.first_step - start, "stopped_at_step": trainer.state.optimizer_step}


def resume(workload: Workload, run_dir: pathlib.Path) -> dict[str, Any]:
    timer = FirstStepTimer()
    trainer = Trainer(config(workload, run_dir, RESUME_EPOCHS, {}), train_data=workload.dataset(), callbacks=[timer])
    start = time.perf_counter()
    trainer.run(resume="latest")
    assert timer.first_step is not None
    return {"to_first_step_s": timer.first_step - start, "steps": trainer.state.optimizer_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("checkpoint-save", "interrupted", "resume"))
    parser.add_argument("--steps-per-epoch", type=int, help="default: the workload's")
    parser.add_argument("--run-dir", type=pathlib.Path, help="the run folder of interrupted and resume")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where the result goes, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = WORKLOADS["heavy" if args.probe == "checkpoint-save" else "tiny"]
    workload = dataclasses.replace(workload, steps_per_epoch=args.steps_per_epoch or workload.steps_per_epoch)
    if args.probe == "checkpoint-save":
        result = checkpoint_save(workload)
    elif args.probe == "interrupted":
        result = interrupted(workload, args.run_dir)
    else:
        result = resume(workload, args.run_dir)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
