"""What agreeing on stopping would cost per optimizer step if it had a collective of its own.

    torchrun --standalone --nproc_per_node 2 benchmarks/agreement.py [--epochs 12] [--calls 500]

Several processes must agree, every optimizer step, on whether a stop signal reached any of them or one
of them asked to stop (``StopSignals.agree``). phasetrain folds that into the tiny all-reduce its
non-finite-loss check makes each step anyway. This measures the alternative: the median train-epoch
time of the digits job on these processes (what a step costs now) and the median cost of one more tiny
all-reduce with its host sync, and prints their ratio per step.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from phasetrain import Callback, RunConfig, Trainer


class EpochTimes(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def on_exit_train_epoch(self, trainer: Trainer) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = pathlib.Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        config = RunConfig.from_file(root / "examples" / "digits.yaml", overrides=[
            f"run_dir={scratch}/run", f"train.epochs={args.epochs}", "train.progress_bar=false",
            "train.log_every_steps=0", "checkpoint.every_epochs=0", "checkpoint.keep_best=0"])
        times = EpochTimes()
        trainer = Trainer(config, callbacks=[times])
        trainer.run()  # its eval epochs are not timed
    accelerator = trainer.accelerator
    flags = torch.zeros(3, device=accelerator.device)
    calls = []
    for _ in range(args.calls):
        started = time.perf_counter()
        accelerator.reduce(flags, reduction="sum").tolist()  # an all-reduce and the host sync to read it
        calls.append(time.perf_counter() - started)
    steps = trainer.data.steps_per_epoch or 1
    step = statistics.median(times.seconds[2:] or times.seconds) / steps
    extra = statistics.median(calls)
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}), torch {torch.__version__}")
        print(f"optimizer step: median {step * 1e3:.2f} ms ({steps} steps an epoch, {len(times.seconds)} epochs)")
        print(f"one more tiny all-reduce + host sync: median {extra * 1e3:.3f} ms")
        print(f"a separate agreement per step would add: {extra / step:.1%}")


if __name__ == "__main__":
    main()
