"""The GPU variant: a small CNN on synthetic images, a plain loop against phasetrain, fp32 and bf16.

    python -m benchmarks --gpu [--repeats 5] [--epochs 4] [--json PATH]
    python -m benchmarks --gpu --device cpu --quick      # a smoke test without a GPU
    python benchmarks/gpu.py ...                         # the same

The workload (``cnn`` in benchmarks/workloads.py): three 3x3 conv layers (32, 64, 128 channels) with ReLU and
pooling, then a linear layer to 10 classes; 3x64x64 random images, batch 256, 32 steps an epoch, 4 epochs;
plain SGD (lr 0.01), cross-entropy. The data stays in host memory and every batch is sent to the device, as
a DataLoader over a dataset does. Four loops (benchmarks/loops.py): ``plain`` (DataLoader(shuffle=True),
``.to(device)``, forward, loss, backward, step, zero_grad, in fp32), ``plain, indexed`` (batches indexed
out of the tensors, as phasetrain reads a TensorDataset), ``phasetrain defaults`` (progress bar,
metrics.jsonl, a checkpoint every epoch) and ``phasetrain bf16`` (the same with ``train.mixed_precision: bf16``).

Timed as the CPU table is (benchmarks/run.py): fresh processes, the loops in a rotated order each repetition,
the median of each run's epoch-start intervals, and the median of per-repetition ratios to plain. On CUDA
every epoch-start time is read after ``torch.cuda.synchronize()``, so an epoch's time is the time its work
took on the device, not the time the host took to queue it. Also printed: each loop's
``torch.cuda.max_memory_allocated()`` (on the CPU, its peak RSS).

``--quick``: batch 32, 4 steps an epoch, 3 epochs, 2 repetitions.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `python benchmarks/gpu.py` too
from benchmarks.run import (
    child_environment,
    header,
    header_lines,
    measure_loops,
    ratio_cell,
    skipped_notes,
    summarize,
    table,
)
from benchmarks.workloads import WORKLOADS

GPU_LOOPS = ["plain", "plain-indexed", "phasetrain", "phasetrain-bf16"]
QUICK = {"repeats": 2, "epochs": 3, "steps_per_epoch": 4, "batch_size": 32}


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the first GPU visible) or cpu (a smoke test)")
    parser.add_argument("--quick", action="store_true", help="everything small: a smoke test, not a measurement")
    parser.add_argument("--repeats", type=int, help="repetitions (default 5; 2 with --quick)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default 4; 3 with --quick), at least 2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    parser.add_argument("--json", type=pathlib.Path, help="also write every figure and raw record here")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK["repeats"] if args.quick else 5
    if args.epochs is not None and args.epochs < 2:
        parser.error("--epochs: at least 2 (an epoch's time runs from its start to the next epoch's start)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    cnn = WORKLOADS["cnn"]
    epochs = args.epochs or (QUICK["epochs"] if args.quick else cnn.epochs)
    steps = QUICK["steps_per_epoch"] if args.quick else cnn.steps_per_epoch
    batch_size = QUICK["batch_size"] if args.quick else cnn.batch_size
    child_args = ["--workload", "cnn", "--epochs", str(epochs), "--steps-per-epoch", str(steps),
                  "--batch-size", str(batch_size), "--threads", str(args.threads), "--device", args.device]
    facts = header(args.threads, args.repeats)
    runs, skipped = measure_loops(GPU_LOOPS, child_args, epochs * steps, args.repeats,
                                  child_environment(args.threads, args.device), "cnn")
    summary = summarize(runs, skipped)
    gpus = [r["cuda_device_name"] for results in runs.values() for r in results if r and r["cuda_device_name"]]
    device = gpus[0] if gpus else facts["cpu_model"]

    lines = header_lines(facts)
    lines.append(f"device: {args.device} ({device}); workload: CNN on 3x64x64 random images, batch {batch_size}, "
                 f"{steps} steps an epoch, {epochs} epochs")
    lines.append("")
    lines.append("per-epoch time against a plain fp32 loop: ratio (median ms/epoch); ratio = median of "
                 f"{args.repeats} per-repetition paired ratios; peak memory")
    cells = {}
    for loop in GPU_LOOPS:
        entry = summary.get(loop)
        cells[(loop, "cnn")] = ratio_cell(entry)
        if entry is not None:
            on_gpu = entry["cuda_peak_mib"] is not None
            peak = entry["cuda_peak_mib"] if on_gpu else entry["peak_rss_mib"]
            cells[(loop, "peak memory")] = f"{peak:.0f} MiB {'allocated on the GPU' if on_gpu else 'RSS'}"
    lines += table(GPU_LOOPS, ["cnn", "peak memory"], cells)
    lines += skipped_notes({"cnn": skipped})
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"header": facts, "device": device, "table": summary, "skipped": skipped,
                                         "raw": {"arguments": child_args, "runs": runs}}, indent=1))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
