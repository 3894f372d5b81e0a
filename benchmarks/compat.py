"""phasetrain.compat against pytorch-accelerated and a plain PyTorch loop: one training workload, three ways.

    python benchmarks/compat.py [--epochs 3] [--repeats 7] [--callbacks none|quiet-defaults]

The workload: an MLP 64-128-64-10 on 8,192 random samples (256 optimizer steps an epoch at batch size 32),
plain SGD (lr 0.01), cross-entropy, no eval set, on the CPU with one torch thread. The pytorch-accelerated
and phasetrain.compat runs are the same code, ``Trainer(model, loss_func, optimizer, callbacks=...)`` then
``trainer.train(train_dataset=..., num_epochs=..., per_device_batch_size=32,
train_dataloader_kwargs={"num_workers": 0})``, with ``Trainer`` imported from ``pytorch_accelerated.trainer``
or ``phasetrain.compat.trainer``. Nothing prints: ``--callbacks none`` (the default) passes ``callbacks=()``;
``quiet-defaults`` passes the default callbacks that neither print nor draw a bar
(``MoveModulesToDeviceCallback, TerminateOnNaNCallback``). ``num_workers=0`` on both: pytorch-accelerated's
default (a worker per CPU, started afresh every epoch) would time process start-up, not the loop.

Every run is a fresh process, so neither library inherits the other's imports, caches or seeds; the three
kinds take turns, in a rotated order each repetition, so machine noise hits them alike. The time is that of
the training call alone (``trainer.train(...)``; for the plain loop, building its DataLoader and the epochs),
not the interpreter start or the imports. Printed: medians, the ratios of the medians and the median of the
per-repetition ratios (the steadier figure on a shared machine). A library that cannot be imported is
reported and left out. pytorch-accelerated is read from ``.reference/``, outside the project's environment
(``pip install --no-deps --target .reference pytorch-accelerated==0.1.61``), as the tests read it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

BATCH_SIZE = 32
STEPS_PER_EPOCH = 256
KINDS = ("plain", "pytorch_accelerated", "phasetrain.compat")


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    samples = STEPS_PER_EPOCH * BATCH_SIZE
    return torch.utils.data.TensorDataset(torch.randn(samples, 64, generator=generator),
                                          torch.randint(0, 10, (samples,), generator=generator))


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.utils.data.Dataset,
               epochs: int) -> None:
    loss_func = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH_SIZE, shuffle=True)
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = loss_func(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def library_loop(library: str, callbacks: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: torch.utils.data.Dataset, epochs: int) -> None:
    trainer_module = importlib.import_module(f"{library}.trainer")
    callbacks_module = importlib.import_module(f"{library}.callbacks")
    chosen: tuple[Any, ...] = ()
    if callbacks == "quiet-defaults":
        chosen = (callbacks_module.MoveModulesToDeviceCallback, callbacks_module.TerminateOnNaNCallback)
    trainer = trainer_module.Trainer(model=model, loss_func=nn.CrossEntropyLoss(), optimizer=optimizer,
                                     callbacks=chosen)
    trainer.train(train_dataset=data, num_epochs=epochs, per_device_batch_size=BATCH_SIZE,
                  train_dataloader_kwargs={"num_workers": 0})


def child(kind: str, epochs: int, seed: int, threads: int, callbacks: str) -> dict[str, Any]:
    """One timed run in this (fresh) process."""
    torch.set_num_threads(threads)
    if kind != "plain":
        try:
            importlib.import_module(f"{kind}.trainer")
        except ImportError as error:  # reported by the parent, which leaves this kind out
            return {"kind": kind, "error": f"{type(error).__name__}: {error}"}
    data = make_data()
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # counts real updates, so the three kinds are seen to do the same work
    steps = [0]
    optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    start = time.perf_counter()
    if kind == "plain":
        plain_loop(model, optimizer, data, epochs)
    else:
        library_loop(kind, callbacks, model, optimizer, data, epochs)
    seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "steps": steps[0]}


def run_child(kind: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--epochs", str(args.epochs), "--seed", str(seed),
               "--threads", str(args.threads), "--callbacks", args.callbacks]
    # this checkout's phasetrain (src/) ahead of any installed copy; pytorch-accelerated from .reference/, last
    root = pathlib.Path(__file__).resolve().parents[1]
    paths = [str(root / "src"), os.environ.get("PYTHONPATH"), str(root / ".reference")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"kind": kind, "error": f"exit {result.returncode}: {result.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the timing stable)")
    parser.add_argument("--callbacks", choices=("none", "quiet-defaults"), default="none")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.seed, args.threads, args.callbacks)))
        return

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    missing: dict[str, str] = {}
    expected_steps = args.epochs * STEPS_PER_EPOCH
    for repeat in range(args.repeats):
        order = KINDS[repeat % 3:] + KINDS[:repeat % 3]
        for kind in order:
            if kind in missing:
                continue
            outcome = run_child(kind, args, seed=repeat)
            if "error" in outcome:
                missing[kind] = outcome["error"]
                continue
            if outcome["steps"] != expected_steps:
                sys.exit(f"{kind} took {outcome['steps']} optimizer steps, not {expected_steps}: not the same work")
            times[kind].append(outcome["seconds"])

    print(f"workload: MLP 64-128-64-10, {expected_steps} SGD steps (epochs: {args.epochs}, {STEPS_PER_EPOCH} steps each, "
          f"batch {BATCH_SIZE}), no eval, {args.threads} torch thread(s), callbacks: {args.callbacks}, "
          f"{args.repeats} repetitions, each run in a fresh process")
    for kind in KINDS:
        if kind in missing:
            print(f"{kind:20s} skipped: {missing[kind].splitlines()[-1] if missing[kind] else 'failed'}")
        else:
            median = statistics.median(times[kind])
            print(f"{kind:20s} median {median * 1e3:7.1f} ms ({median / expected_steps * 1e6:5.0f} us/step)")
    for numerator, denominator in (("pytorch_accelerated", "plain"), ("phasetrain.compat", "plain"),
                                   ("pytorch_accelerated", "phasetrain.compat")):
        if numerator in missing or denominator in missing:
            continue
        top, bottom = times[numerator], times[denominator]
        paired = statistics.median(t / b for t, b in zip(top, bottom, strict=True))
        print(f"ratio {numerator}/{denominator}: {statistics.median(top) / statistics.median(bottom):.3f} (medians), "
              f"{paired:.3f} (median of {len(top)} paired ratios)")


if __name__ == "__main__":
    main()
