"""Trainer overhead against a plain hand-written PyTorch loop: same model, data, batch size and steps.

    python benchmarks/overhead.py [--epochs 10] [--repeats 9] [--extra-phases 2] [--tracking tensorboard]

Interleaves repetitions (raw, trainer, raw, trainer, ...) so machine noise hits both alike, and prints
the median times, the ratio of the medians and the median of the per-pair ratios (the steadier figure
on a shared machine). The trainer runs with its default callbacks (progress bar,
console summary, history, metrics.jsonl), no eval set and no checkpoints, so both sides do the same work:
``epochs`` passes of AdamW steps over the digits train split at batch size 32 on the CPU.

``--extra-phases N`` adds N no-op phases after ``train_epoch``, entered every epoch: the graph grows,
the batch loop must not slow down (compare against a run without them).

``--tracking tensorboard`` also times the trainer logging every record to TensorBoard (through accelerate)
and prints how much its ratio to the raw loop rises over the trainer's without trackers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples.digits import make_data, make_model
from phasetrain import Phase, RunConfig, Trainer

BATCH_SIZE = 32


def raw_loop(train: torch.utils.data.Dataset, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH_SIZE, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_run(train: torch.utils.data.Dataset, epochs: int, seed: int, extra_phases: int = 0,
                tracking: list[str] | None = None) -> float:
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="overhead-")) / "run"
    config = RunConfig.from_dict({
        "run_dir": str(run_dir), "seed": seed,
        "model": {"target": "examples.digits:make_model"},
        "loss": "torch.nn:CrossEntropyLoss",
        "optimizer": {"target": "torch.optim:AdamW", "args": {"lr": 2e-3}},
        "train": {"epochs": epochs, "batch_size": BATCH_SIZE},
        "checkpoint": {"every_epochs": 0},
        "tracking": {"log_with": tracking or []},
    })
    trainer = Trainer(config, train_data=train)
    for index in range(extra_phases):
        trainer.add_phase(NoOp(f"extra_{index}"), after="train_epoch")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        trainer.run()
        return time.perf_counter() - start


class NoOp(Phase):
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, trainer: Trainer) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the timing stable)")
    parser.add_argument("--extra-phases", type=int, default=0,
                        help="also time the trainer with N extra no-op phases and print that ratio")
    parser.add_argument("--tracking", nargs="*", default=[], metavar="TRACKER",
                        help="also time the trainer logging to these trackers (e.g. tensorboard)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = make_data(seed=0)["train"]
    raw_loop(train, 1, 0), trainer_run(train, 1, 0), trainer_run(train, 1, 0, args.extra_phases)  # warm up
    if args.tracking:
        trainer_run(train, 1, 0, tracking=args.tracking)
    raw_times, trainer_times, extra_times, tracked_times = [], [], [], []
    for repeat in range(args.repeats):
        raw_times.append(raw_loop(train, args.epochs, repeat))
        trainer_times.append(trainer_run(train, args.epochs, repeat))
        if args.extra_phases:
            extra_times.append(trainer_run(train, args.epochs, repeat, args.extra_phases))
        if args.tracking:
            tracked_times.append(trainer_run(train, args.epochs, repeat, tracking=args.tracking))
    raw, trained = statistics.median(raw_times), statistics.median(trainer_times)
    paired = statistics.median(t / r for t, r in zip(trainer_times, raw_times, strict=True))
    steps = args.epochs * -(-len(train) // BATCH_SIZE)
    print(f"steps per run: {steps} (epochs {args.epochs}, batch {BATCH_SIZE}, {len(train)} samples)")
    print(f"raw loop: median {raw * 1e3:.1f} ms ({raw / steps * 1e6:.0f} us/step)")
    print(f"trainer:  median {trained * 1e3:.1f} ms ({trained / steps * 1e6:.0f} us/step)")
    print(f"ratio trainer/raw (medians): {trained / raw:.3f}")
    print(f"ratio trainer/raw (median of {args.repeats} interleaved pairs): {paired:.3f}")
    if extra_times:
        extra = statistics.median(e / t for e, t in zip(extra_times, trainer_times, strict=True))
        print(f"trainer with {args.extra_phases} extra phases: median {statistics.median(extra_times) * 1e3:.1f} ms; "
              f"ratio to the default graph (median of pairs): {extra:.3f}")
    if tracked_times:
        tracked = statistics.median(t / r for t, r in zip(tracked_times, raw_times, strict=True))
        against = statistics.median(t / u for t, u in zip(tracked_times, trainer_times, strict=True))
        print(f"trainer logging to {', '.join(args.tracking)}: median {statistics.median(tracked_times) * 1e3:.1f} ms; "
              f"ratio to raw (median of pairs) {tracked:.3f}, {tracked - paired:+.3f} over the trainer without; "
              f"to the trainer without (median of pairs) {against:.3f}")


if __name__ == "__main__":
    main()
