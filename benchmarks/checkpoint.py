"""Checkpoint cost: save time against a bare ``torch.save`` of the same tensors, and resume-to-mid-epoch time.

    python benchmarks/checkpoint.py [--hidden 2048] [--repeats 5]

1. Save: a trainer checkpoint (model safetensors, optimizer, RNG, callbacks, state, CRC-32 manifest, fsync
   and atomic rename), from ``save_checkpoint()`` until ``wait_for_checkpoints()`` returns (and the part
   training waits for, ``save_checkpoint()`` alone: the snapshot), against ``torch.save({"model": ..., "optimizer": ...}, path)`` of the same model and
   AdamW state, interleaved, medians; ``os.sync()`` before each timed save so neither pays for the other's
   dirty pages. The bare save does not fsync, the checkpoint does (that is what makes it crash-safe), so
   a torch.save followed by an fsync is timed as well. Target: what training waits for <= 1.25x the bare save.
2. Resume: time from ``run(resume=...)`` (checkpoint verification and loading included) to the start of
   the first step of the resumed epoch, for a checkpoint taken one step before the end of an epoch,
   against the time of one whole epoch; that first step loads its own batch, which is shown apart. Skipped batches are skipped
   by sampler index, so no data is loaded for them. Target: < 5% of the epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from phasetrain import Callback, RunConfig, Trainer


class SlowDigits(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Digits-shaped random data whose every sample costs ``load_ms`` to load, like a decoded image."""

    def __init__(self, size: int, load_ms: float) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.rand(size, 64, generator=generator)
        self.targets = torch.randint(0, 10, (size,), generator=generator)
        self.load_s = load_ms / 1e3

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        deadline = time.perf_counter() + self.load_s
        while time.perf_counter() < deadline:
            pass
        return self.inputs[index], self.targets[index]


def config(run_dir: pathlib.Path, hidden: int, epochs: int = 1, every_steps: int | None = None) -> RunConfig:
    return RunConfig.from_dict({
        "run_dir": str(run_dir), "model": {"target": "examples.digits:make_model", "args": {"hidden": hidden}},
        "loss": "torch.nn:CrossEntropyLoss", "optimizer": {"target": "torch.optim:AdamW"},
        "train": {"epochs": epochs, "batch_size": 32, "progress_bar": False},
        "checkpoint": {"every_epochs": 0, "every_steps": every_steps, "keep_last": 1000},
    })


def save_ratio(hidden: int, repeats: int) -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    data = SlowDigits(64, 0.0)
    trainer = Trainer(config(root / "run", hidden), train_data=data)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.run()  # one epoch so AdamW has its state
    model = trainer.accelerator.unwrap_model(trainer.model)
    megabytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 2**20
    bare, durable, ours, blocking = [], [], [], []
    for repeat in range(repeats):
        for times, sync in ((bare, False), (durable, True)):
            target = root / f"bare-{repeat}-{sync}.pt"
            os.sync()  # each timed save starts with no dirty pages left over from the others
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.optimizer.state_dict()}, target)
            if sync:
                with open(target, "rb") as file:
                    os.fsync(file.fileno())
            times.append(time.perf_counter() - start)
        trainer.state.optimizer_step += 1  # a new checkpoint name each time
        os.sync()
        start = time.perf_counter()
        trainer.save_checkpoint()  # returns once the state is copied: training would go on from here
        blocking.append(time.perf_counter() - start)
        trainer.wait_for_checkpoints()
        ours.append(time.perf_counter() - start)
    shutil.rmtree(root)
    ours_s = statistics.median(ours)
    print(f"save: model + AdamW state ~{megabytes:.0f} MB; checkpoint median {ours_s * 1e3:.1f} ms written, of which "
          f"training waits {statistics.median(blocking) * 1e3:.1f} ms (the snapshot; the rest is in the background)")
    bare_s, waited_s = statistics.median(bare), statistics.median(blocking)
    print(f"  bare torch.save median {bare_s * 1e3:.1f} ms: training waits {waited_s / bare_s:.2f}x of it "
          f"(target <= 1.25x), the whole write takes {ours_s / bare_s:.2f}x")
    print(f"  torch.save + fsync median {statistics.median(durable) * 1e3:.1f} ms: "
          f"the whole write takes {ours_s / statistics.median(durable):.2f}x")


class FirstBatchTimer(Callback):
    def __init__(self) -> None:
        self.at: float | None = None

    def on_train_step_start(self, trainer: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def resume_ratio(repeats: int) -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="resume-bench-"))
    data = SlowDigits(1024, load_ms=0.2)  # 32 steps of 32 samples, 0.2 ms per sample to load
    steps = len(data) // 32
    epoch_times, resume_times = [], []
    for repeat in range(repeats):
        run_dir = root / f"run-{repeat}"
        trainer = Trainer(config(run_dir, 128, epochs=2, every_steps=steps - 1), train_data=data)
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            trainer.run()
            epoch_times.append((time.perf_counter() - start) / 2)
        # Resume from the checkpoint at the epoch's second-to-last step: all but one batch are skipped.
        checkpoint = next((run_dir / "checkpoints").glob(f"epoch001-step{steps - 1:07d}-*"))
        (run_dir / "model.safetensors").unlink()
        timer = FirstBatchTimer()
        resumed = Trainer(config(run_dir, 128, epochs=2, every_steps=steps - 1), train_data=data, callbacks=[timer])
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            resumed.run(resume=checkpoint)
        assert timer.at is not None
        resume_times.append(timer.at - start)
    shutil.rmtree(root)
    epoch, resume = statistics.median(epoch_times), statistics.median(resume_times)
    one_batch = epoch / steps  # the first step of the resumed epoch loads its own batch: that is not skipping
    print(f"resume: epoch of {steps} steps median {epoch * 1e3:.1f} ms; from run(resume=...) to the start of "
          f"step {steps} median {resume * 1e3:.1f} ms = {resume / epoch:.1%} of the epoch (target < 5%); "
          f"without loading that step's own batch (~{one_batch * 1e3:.1f} ms): {(resume - one_batch) / epoch:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048, help="MLP width for the save benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    save_ratio(args.hidden, args.repeats)
    resume_ratio(args.repeats)


if __name__ == "__main__":
    main()
