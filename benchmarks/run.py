"""The benchmark suite: phasetrain and its peers against a plain PyTorch loop, measured in the same invocation.

    python -m benchmarks [--quick] [--repeats 5] [--only tiny,heavy] [--loops plain,phasetrain,...]
                         [--threads 1] [--json PATH] [--no-install] [--no-extras]
    python -m benchmarks --gpu ...       # the GPU variant: benchmarks/gpu.py

The table: per-epoch time of each loop, as a ratio to a plain hand-written PyTorch loop, on two workloads
(benchmarks/workloads.py), both plain SGD (lr 0.01) and cross-entropy, no eval set, on the CPU:

- ``tiny``: an MLP 64-128-64-10, batch 32, 8,192 random samples (256 steps an epoch), 6 epochs;
- ``heavy``: an MLP 784-1024-1024-10, batch 256, 8,192 random samples (32 steps an epoch), 4 epochs.

The loops (benchmarks/loops.py): ``plain`` (DataLoader(shuffle=True), forward, loss, backward, step,
zero_grad); ``plain, indexed`` (the same without a DataLoader: each batch indexed out of the data's tensors
by a random permutation, as phasetrain reads a TensorDataset); ``phasetrain defaults`` (``Trainer(RunConfig, train_data=...).run()``: progress bar, console lines,
metrics.jsonl, a checkpoint every epoch); ``phasetrain off`` (no progress bar, ``log_every_steps: 0``, no
checkpoints); ``phasetrain compiled`` (the defaults with ``train.compile: true``; the first epoch, which
compiles, is one of the intervals the median leaves behind); ``accelerate`` (a hand-written loop through ``Accelerator(cpu=True)``); ``ignite``
(``create_supervised_trainer``); ``lightning`` (a LightningModule and a default ``lightning.Trainer``: progress
bar, model summary, logger and per-epoch ModelCheckpoint kept); ``pytorch-accelerated`` (its ``Trainer`` with
its default callbacks, ``num_workers=0``). The model, the data, the batch size and the number of optimizer
steps are the same for all; a hook on the torch optimizer counts the steps, and a loop that did a different
number is reported and left out.

How it is timed. Every run is a fresh ``python`` process (imports, caches and seeds are not shared), with
``torch.set_num_threads(--threads)`` (and OMP_NUM_THREADS) and no GPU visible; the loops take turns in a
rotated order each repetition, so machine noise hits them alike; repetition r seeds every loop with r. Each
loop records ``time.perf_counter()`` at the start of every epoch through its library's own hook (phasetrain:
a callback's ``on_enter_train_epoch``; ignite: ``Events.EPOCH_STARTED``; Lightning:
``Callback.on_train_epoch_start``; pytorch-accelerated: ``TrainerCallback.on_train_epoch_start``; inline in
the hand-written loops). An epoch's time runs from its start to the next epoch's start, so what a library
does between epochs (a checkpoint, anything still running in the background after it, console lines) falls
inside it. A run's per-epoch time is the median of its E-1 epoch-start intervals: the last epoch ends in the
library's run teardown (final weights, closing files), which plain has none of and which is not a per-epoch
cost; the time the training call returned is recorded too (``call_returned`` in the JSON). The first
interval holds the first epoch's warm-up, which the median of 3 or more intervals is not moved by. Each cell is
"ratio (median ms/epoch)": the median over repetitions of the per-repetition ratio to plain (the steadier
figure on a shared machine), and the median of the runs' per-epoch times.

Peers: pytorch-ignite and lightning (+ lightning-utilities) are installed by this script with
``pip install --no-deps --target .peers`` (their other needs are phasetrain's own), pytorch-accelerated
is read from ``.reference/`` (see README.md); both folders go at the END of the children's PYTHONPATH, after
``src/`` and the repository root, so they shadow nothing. A peer that fails to install or import is left out,
with a note. ``--no-install`` installs nothing.

Extra figures, each the median over fresh processes, interleaved with its baseline where it has one:

- import: ``python -c "import phasetrain; phasetrain.Trainer"`` against ``python -c "import torch, accelerate"``
  (the whole process, interpreter start included), and the median of the paired differences;
- CLI start-up: ``phasetrain --help`` and an argument error (``phasetrain run no-such-file.yaml``, exit 2);
- start to first step: ``phasetrain run CONFIG.yaml`` (the tiny workload by import specs), from just before
  the process is started (``time.time()`` in this process) to the end of its first optimizer step (a
  ``callbacks:`` entry writes ``time.time()`` there), against the plain loop's child to its first step;
- checkpoint save (heavy model): ``save_checkpoint()`` (the blocking part) and that plus
  ``wait_for_checkpoints()`` (the total), called by a callback at the end of a train epoch in a run with
  ``checkpoint.every_epochs: 0``, the second epoch's save of each process; a bare ``torch.save`` of the same
  state, for scale (benchmarks/probes.py);
- resume: a run of the tiny workload with the defaults, stopped by SIGTERM in the middle of its second epoch,
  then a fresh process's ``Trainer(config).run(resume="latest")``: from the call to the end of its first
  optimizer step, against a fresh run's ``run()`` to its first step (benchmarks/probes.py);
- memory, from the table's runs: peak RSS (``ru_maxrss``) and its growth over the RSS just before the training
  call (``/proc/self/statm``), and phasetrain defaults' growth against plain's.

``--quick`` makes everything small (2 repetitions, 3 epochs, 8 heavy steps an epoch): a smoke test, not a
measurement. ``--json PATH`` also writes every figure and every run's raw record.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.metadata
import itertools
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` as well as `python -m benchmarks`
from benchmarks.workloads import WORKLOADS

PEERS_DIR = ROOT / ".peers"
REFERENCE_DIR = ROOT / ".reference"
#: What goes into PEERS_DIR, by the module each installs: pinned, so that two runs of the suite compare.
PEERS = {"ignite": "pytorch-ignite==0.5.5", "lightning": "lightning==2.6.6",
         "lightning_utilities": "lightning-utilities==0.15.3"}
#: The table's loops, in its order (benchmarks/loops.py has one more, for the GPU variant).
TABLE_LOOPS = ("plain", "plain-indexed", "phasetrain", "phasetrain-off", "phasetrain-compiled", "accelerate", "ignite", "lightning", "pytorch-accelerated")
LABELS = {"plain-indexed": "plain, indexed", "phasetrain": "phasetrain defaults", "phasetrain-compiled": "phasetrain compiled", "phasetrain-off": "phasetrain off", "phasetrain-bf16": "phasetrain bf16"}
TABLE_WORKLOADS = ("tiny", "heavy")
QUICK = {"repeats": 2, "epochs": 3, "heavy_steps_per_epoch": 8}
CHILD_TIMEOUT_S = 900  # one child that hangs fails its cell, not the suite


# ---- children -------------------------------------------------------------------------------------------
def child_environment(threads: int, device: str = "cpu") -> dict[str, str]:
    """This checkout's phasetrain (src/) and the benchmarks first; the peers' folders last, shadowing nothing."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH"), str(PEERS_DIR), str(REFERENCE_DIR)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":  # on a machine with a GPU, a library would otherwise pick it while plain stays on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_python_child(module: str, arguments: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``python -m module arguments --out FILE``; its JSON result, with ``launched_wall`` (``time.time()`` just
    before the process started) added, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory(prefix="phasetrain-bench-") as scratch:
        out = pathlib.Path(scratch) / "result.json"
        command = [sys.executable, "-m", module, *arguments, "--out", str(out)]
        launched = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                                  timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        if done.returncode != 0 or not out.is_file():
            return {"error": f"exit {done.returncode}: {last_line(done.stderr)}"}
        return {**json.loads(out.read_text()), "launched_wall": launched}


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Seconds from starting ``command`` to its exit."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=CHILD_TIMEOUT_S)
    return time.perf_counter() - start, done


def rotated(items: list[str], repeat: int) -> list[str]:
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


def progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


# ---- peers ----------------------------------------------------------------------------------------------
def install_peers() -> list[str]:
    """Install the missing peers into PEERS_DIR; notes for what failed."""
    missing = [requirement for module, requirement in PEERS.items()
               if importlib.machinery.PathFinder.find_spec(module, [str(PEERS_DIR)]) is None]
    if not missing:
        return []
    progress(f"installing {', '.join(missing)} into {PEERS_DIR.relative_to(ROOT)}")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(PEERS_DIR),
               *missing]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return [f"installing {', '.join(missing)} failed (exit {done.returncode}): {last_line(done.stderr)}"]
    return []


def peer_versions() -> str:
    found = []
    for folder in (PEERS_DIR, REFERENCE_DIR):
        for distribution in importlib.metadata.distributions(path=[str(folder)]):
            found.append(f"{distribution.metadata['Name']} {distribution.version} ({folder.relative_to(ROOT)})")
    return ", ".join(sorted(found)) or "none found"


# ---- the table ------------------------------------------------------------------------------------------
def measure_loops(loops: list[str], child_args: list[str], expected_steps: int, repeats: int, env: dict[str, str],
                  label: str) -> tuple[dict[str, list[dict[str, Any] | None]], dict[str, str]]:
    """Every loop once per repetition, in a rotated order; a loop that fails or does other work is skipped
    from then on (its note in the second dict)."""
    runs: dict[str, list[dict[str, Any] | None]] = {loop: [None] * repeats for loop in loops}
    skipped: dict[str, str] = {}
    for repeat in range(repeats):
        for loop in rotated(loops, repeat):
            if loop in skipped:
                continue
            progress(f"{label}: repetition {repeat + 1}/{repeats}, {loop}")
            result = run_python_child("benchmarks.loops", ["--loop", loop, "--seed", str(repeat), *child_args], env)
            if "error" in result:
                skipped[loop] = result["error"]
            elif result["steps"] != expected_steps:
                skipped[loop] = f"did {result['steps']} optimizer steps, not {expected_steps}: not the same work"
            else:
                runs[loop][repeat] = result
    return runs, skipped


def epoch_seconds(result: dict[str, Any]) -> float:
    """The median of a run's epoch-start intervals."""
    starts = result["epoch_starts"]
    return statistics.median(later - earlier for earlier, later in itertools.pairwise(starts))


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict[str, Any] | None]], skipped: dict[str, str],
              baseline: str = "plain") -> dict[str, dict[str, Any]]:
    """Per loop: per-epoch times, the ratios to ``baseline``, memory and start-up figures."""
    epochs = {loop: [epoch_seconds(r) if r else None for r in results] for loop, results in runs.items()}
    summary = {}
    for loop, results in runs.items():
        if loop in skipped:
            continue
        done = [r for r in results if r]
        measured = [e for e in epochs[loop] if e is not None]
        entry: dict[str, Any] = {
            "epoch_s": epochs[loop],
            "median_epoch_s": statistics.median(measured),
            "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in done) / 2**20,
            "rss_growth_mib": statistics.median(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in done) / 2**20,
            "start_to_first_step_s": statistics.median(r["first_step_wall"] - r["launched_wall"] for r in done),
            "cuda_peak_mib": median_or_none([r["cuda_peak_bytes"] / 2**20 for r in done if r["cuda_peak_bytes"]]),
        }
        if baseline in runs and baseline not in skipped:
            pairs = [e / b for e, b in zip(epochs[loop], epochs[baseline]) if e is not None and b is not None]
            entry["paired_ratio"] = median_or_none(pairs)
            entry["ratio_of_medians"] = entry["median_epoch_s"] / statistics.median(
                [b for b in epochs[baseline] if b is not None])
        summary[loop] = entry
    return summary


def milliseconds(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def table(rows: list[str], columns: list[str], cell: dict[tuple[str, str], str], first_width: int = 22) -> list[str]:
    width = max([18, *(len(text) + 2 for text in cell.values())])
    lines = [f"{'loop':{first_width}s}" + "".join(f"{column:{width}s}" for column in columns)]
    for row in rows:
        lines.append(f"{LABELS.get(row, row):{first_width}s}"
                     + "".join(f"{cell.get((row, column), '-'):{width}s}" for column in columns))
    return lines


def ratio_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "skipped"
    ratio = entry.get("paired_ratio")
    return f"{ratio:.2f} ({milliseconds(entry['median_epoch_s'])})" if ratio else milliseconds(entry["median_epoch_s"])


def indexed_lines(summaries: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """phasetrain against the plain loop that indexes its batches as phasetrain does: the library's own cost."""
    parts = [f"{LABELS[loop]} {workload} {summary[loop]['paired_ratio']:.2f}"
             for loop in ("phasetrain", "phasetrain-off") for workload, summary in summaries.items()
             if summary.get(loop, {}).get("paired_ratio")]
    return [f"against plain, indexed (same data path, so the library's own cost): {', '.join(parts)}"] if parts else []


def skipped_notes(skipped_by_workload: dict[str, dict[str, str]]) -> list[str]:
    notes: dict[str, list[str]] = {}
    for workload, skipped in skipped_by_workload.items():
        for loop, why in skipped.items():
            notes.setdefault(f"{LABELS.get(loop, loop)}: {why}", []).append(workload)
    return [f"skipped ({', '.join(workloads)}) {note}" for note, workloads in notes.items()]


# ---- extra figures --------------------------------------------------------------------------------------
IMPORTS = {"phasetrain": "import phasetrain; phasetrain.Trainer", "torch + accelerate": "import torch, accelerate"}


def phasetrain_command() -> list[str]:
    """The console script beside this interpreter or on PATH; else ``python -m phasetrain``."""
    search = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("phasetrain", path=search)
    return [script] if script else [sys.executable, "-m", "phasetrain"]


def import_times(env: dict[str, str], repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for repeat in range(repeats):
        for name in rotated(list(IMPORTS), repeat):
            seconds, done = timed([sys.executable, "-c", IMPORTS[name]], env)
            if done.returncode != 0:
                return {"error": f"python -c {IMPORTS[name]!r}: exit {done.returncode}: {last_line(done.stderr)}"}
            times[name].append(seconds)
    ours, theirs = times["phasetrain"], times["torch + accelerate"]
    return {"phasetrain_s": statistics.median(ours), "torch_accelerate_s": statistics.median(theirs),
            "paired_difference_s": statistics.median(a - b for a, b in zip(ours, theirs)), "runs": times}


def cli_times(env: dict[str, str], repeats: int) -> dict[str, Any]:
    cli = phasetrain_command()
    cases = {"help": ([*cli, "--help"], 0), "argument_error": ([*cli, "run", "no-such-file.yaml"], 2)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(repeats):
        for name in rotated(list(cases), repeat):
            command, expected = cases[name]
            seconds, done = timed(command, env)
            if done.returncode != expected:
                return {"error": f"{' '.join(command)}: exit {done.returncode}, not {expected}: {last_line(done.stderr)}"}
            times[name].append(seconds)
    return {"command": " ".join(cli), "help_s": statistics.median(times["help"]),
            "argument_error_s": statistics.median(times["argument_error"]), "runs": times}


def cli_first_step(env: dict[str, str], scratch: pathlib.Path) -> float | str:
    """Seconds from starting ``phasetrain run CONFIG.yaml`` to the end of its first optimizer step, or an error."""
    tiny = WORKLOADS["tiny"]
    stamp = scratch / "first-step"
    config = {
        "run_dir": str(scratch / "run"),
        "model": tiny.model,
        "data": {"target": "benchmarks.workloads:splits", "args": {"workload": "tiny"}},
        "loss": "torch.nn:CrossEntropyLoss",
        "optimizer": {"target": "torch.optim:SGD", "args": {"lr": tiny.lr}},
        "train": {"epochs": 1, "batch_size": tiny.batch_size},
        "callbacks": [{"target": "benchmarks.phasetrain_callbacks:FirstStepStamp", "args": {"path": str(stamp)}}],
    }
    config_file = scratch / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    launched = time.time()
    _, done = timed([*phasetrain_command(), "run", str(config_file)], env)
    if done.returncode != 0 or not stamp.is_file():
        return f"phasetrain run: exit {done.returncode}: {last_line(done.stderr)}"
    return float(stamp.read_text()) - launched


def first_step_times(env: dict[str, str], repeats: int, threads: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"phasetrain run": [], "plain": []}
    plain_args = ["--loop", "plain", "--workload", "tiny", "--epochs", "1", "--threads", str(threads)]
    for repeat in range(repeats):
        for name in rotated(list(times), repeat):
            if name == "plain":
                result = run_python_child("benchmarks.loops", plain_args, env)
                if "error" in result:
                    return {"error": f"plain loop: {result['error']}"}
                times[name].append(result["first_step_wall"] - result["launched_wall"])
            else:
                with tempfile.TemporaryDirectory(prefix="phasetrain-bench-cli-") as scratch:
                    seconds = cli_first_step(env, pathlib.Path(scratch))
                if isinstance(seconds, str):
                    return {"error": seconds}
                times[name].append(seconds)
    return {"phasetrain_run_s": statistics.median(times["phasetrain run"]), "plain_s": statistics.median(times["plain"]),
            "runs": times}


def checkpoint_save_times(env: dict[str, str], repeats: int, heavy_steps: int, threads: int) -> dict[str, Any]:
    arguments = ["checkpoint-save", "--steps-per-epoch", str(heavy_steps), "--threads", str(threads)]
    results = []
    for repeat in range(repeats):
        progress(f"checkpoint save: process {repeat + 1}/{repeats}")
        result = run_python_child("benchmarks.probes", arguments, env)
        if "error" in result:
            return {"error": result["error"]}
        results.append(result)
    return {name: statistics.median(r[name] for r in results)
            for name in ("blocking_s", "total_s", "bare_torch_save_s", "model_megabytes")} | {"runs": results}


def resume_times(env: dict[str, str], repeats: int, threads: int) -> dict[str, Any]:
    fresh, resumed = [], []
    for repeat in range(repeats):
        progress(f"resume: process pair {repeat + 1}/{repeats}")
        with tempfile.TemporaryDirectory(prefix="phasetrain-bench-resume-") as scratch:
            run_dir = ["--run-dir", str(pathlib.Path(scratch) / "run"), "--threads", str(threads)]
            first = run_python_child("benchmarks.probes", ["interrupted", *run_dir], env)
            if "error" in first:
                return {"error": f"the interrupted run: {first['error']}"}
            second = run_python_child("benchmarks.probes", ["resume", *run_dir], env)
            if "error" in second:
                return {"error": f"the resume: {second['error']}"}
        fresh.append(first["to_first_step_s"])
        resumed.append(second["to_first_step_s"])
    return {"resume_to_first_step_s": statistics.median(resumed), "fresh_to_first_step_s": statistics.median(fresh),
            "stopped_at_step": first["stopped_at_step"], "runs": {"fresh": fresh, "resumed": resumed}}


#: Each extra figure: its key in the extras, its name, and its line when it was measured.
EXTRA_LINES: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("import", "import", lambda f: (
        f"import (python -c, whole process): phasetrain {f['phasetrain_s']:.2f} s, torch + accelerate "
        f"{f['torch_accelerate_s']:.2f} s: {f['paired_difference_s']:+.2f} s (median of paired differences)")),
    ("cli", "CLI start-up", lambda f: (
        f"CLI start-up ({f['command']}): --help {f['help_s']:.2f} s, run no-such-file.yaml (exit 2) "
        f"{f['argument_error_s']:.2f} s")),
    ("first_step", "start to first step", lambda f: (
        f"start to first step, tiny: phasetrain run CONFIG.yaml {f['phasetrain_run_s']:.2f} s; plain loop script "
        f"{f['plain_s']:.2f} s")),
    ("checkpoint_save", "checkpoint save, heavy", lambda f: (
        f"checkpoint save, heavy ({f['model_megabytes']:.1f} MB of weights, SGD): blocking "
        f"{milliseconds(f['blocking_s'])}, total {milliseconds(f['total_s'])}; bare torch.save "
        f"{milliseconds(f['bare_torch_save_s'])}")),
    ("resume", "resume", lambda f: (
        f"resume, tiny (SIGTERM at step {f['stopped_at_step']}, mid-epoch 2): run(resume='latest') to the first "
        f"step {milliseconds(f['resume_to_first_step_s'])}; a fresh run() to its first step "
        f"{milliseconds(f['fresh_to_first_step_s'])}")),
]


def extra_lines(extras: dict[str, dict[str, Any]], repeats: int) -> list[str]:
    lines = [f"extra figures (medians of {repeats} fresh processes each):"]
    for key, name, line in EXTRA_LINES:
        figure = extras.get(key)
        if figure:
            lines.append(f"  {name}: {figure['error']}" if "error" in figure else f"  {line(figure)}")
    return lines


def memory_lines(summaries: dict[str, dict[str, dict[str, Any]]], loops: list[str]) -> list[str]:
    cells = {(loop, workload): f"{entry['peak_rss_mib']:.0f} (+{entry['rss_growth_mib']:.0f})"
             for workload, summary in summaries.items() for loop, entry in summary.items()}
    lines = ["memory, from the table's runs: peak RSS MiB (+ growth during the training call)"]
    lines += table(loops, list(summaries), cells)
    growth = []
    for workload, summary in summaries.items():
        if "phasetrain" in summary and "plain" in summary and summary["plain"]["rss_growth_mib"] > 0:
            ratio = summary["phasetrain"]["rss_growth_mib"] / summary["plain"]["rss_growth_mib"]
            growth.append(f"{workload} {ratio:.2f}x")
    if growth:
        lines.append(f"phasetrain defaults' growth / plain's: {', '.join(growth)}")
    return lines


# ---- the report -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def phasetrain_revision() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git revision unknown"
    return f"git {commit}{', src/ changed since' if changed else ''}"


def header(threads: int, repeats: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "accelerate": importlib.metadata.version("accelerate"),
        "phasetrain": f"{importlib.metadata.version('phasetrain')} ({phasetrain_revision()})",
        "peers": peer_versions(),
        "torch_threads": threads,
        "repetitions": repeats,
    }


def header_lines(facts: dict[str, Any]) -> list[str]:
    machine = (f"{facts['platform']}, {facts['cpus_usable']} CPUs usable, os.cpu_count() {facts['os_cpu_count']}, "
               f"{facts['cpu_model']}")
    versions = (f"python {facts['python']}, torch {facts['torch']}, accelerate {facts['accelerate']}, "
                f"phasetrain {facts['phasetrain']}")
    return [f"date: {facts['date']}", f"machine: {machine}", versions, f"peers: {facts['peers']}",
            f"torch threads: {facts['torch_threads']}; repetitions: {facts['repetitions']}"]


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU variant instead (benchmarks/gpu.py, "
                        "its own options: python -m benchmarks --gpu --help)")
    parser.add_argument("--quick", action="store_true", help="everything small: a smoke test, not a measurement")
    parser.add_argument("--repeats", type=int, help="repetitions (default 5; 2 with --quick)")
    parser.add_argument("--epochs", type=int, help="epochs of every table run (default: tiny 6, heavy 4; 3 with "
                        "--quick); at least 2, as an epoch's time is between two epoch starts")
    parser.add_argument("--only", default=",".join(TABLE_WORKLOADS), help="workloads, comma-separated")
    parser.add_argument("--loops", default=",".join(TABLE_LOOPS), help="loops, comma-separated (plain is always run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child (1 keeps timings stable)")
    parser.add_argument("--json", type=pathlib.Path, help="also write every figure and raw record here")
    parser.add_argument("--no-install", action="store_true", help="do not install the peers into .peers/")
    parser.add_argument("--no-extras", action="store_true", help="the table alone")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    args.loops = [name for name in args.loops.split(",") if name]
    for given, known, what in ((args.only, TABLE_WORKLOADS, "--only"), (args.loops, TABLE_LOOPS, "--loops")):
        unknown = [name for name in given if name not in known]
        if unknown:
            parser.error(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    args.loops = ["plain", *(loop for loop in TABLE_LOOPS if loop in args.loops and loop != "plain")]
    if args.repeats is None:
        args.repeats = QUICK["repeats"] if args.quick else 5
    if args.epochs is not None and args.epochs < 2:
        parser.error("--epochs: at least 2 (an epoch's time runs from its start to the next epoch's start)")
    return args


def workload_arguments(name: str, args: argparse.Namespace) -> tuple[list[str], int]:
    """The loops child's arguments for workload ``name`` and the optimizer steps each run must take."""
    workload = WORKLOADS[name]
    epochs = args.epochs or (QUICK["epochs"] if args.quick else workload.epochs)
    steps = QUICK["heavy_steps_per_epoch"] if args.quick and name == "heavy" else workload.steps_per_epoch
    arguments = ["--workload", name, "--epochs", str(epochs), "--steps-per-epoch", str(steps),
                 "--threads", str(args.threads), "--device", "cpu"]
    return arguments, epochs * steps


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:  # the GPU variant has options of its own
        from benchmarks import gpu
        gpu.main([argument for argument in argv if argument != "--gpu"])
        return
    args = parse_arguments(argv)
    notes = [] if args.no_install else install_peers()
    facts = header(args.threads, args.repeats)
    env = child_environment(args.threads)

    summaries, against_indexed, skipped_by_workload, raw = {}, {}, {}, {}
    for name in args.only:
        child_args, expected_steps = workload_arguments(name, args)
        runs, skipped = measure_loops(args.loops, child_args, expected_steps, args.repeats, env, name)
        summaries[name] = summarize(runs, skipped)
        against_indexed[name] = summarize(runs, skipped, baseline="plain-indexed")
        skipped_by_workload[name] = skipped
        raw[name] = {"arguments": child_args, "expected_steps": expected_steps, "runs": runs}

    extras: dict[str, dict[str, Any]] = {}
    if not args.no_extras:
        heavy_steps = QUICK["heavy_steps_per_epoch"] if args.quick else WORKLOADS["heavy"].steps_per_epoch
        progress("import and CLI start-up")
        extras["import"] = import_times(env, args.repeats)
        extras["cli"] = cli_times(env, args.repeats)
        progress("start to first step")
        extras["first_step"] = first_step_times(env, args.repeats, args.threads)
        extras["checkpoint_save"] = checkpoint_save_times(env, args.repeats, heavy_steps, args.threads)
        extras["resume"] = resume_times(env, args.repeats, args.threads)

    lines = header_lines(facts) + notes + [""]
    lines.append("per-epoch time against a plain PyTorch loop (same invocation): ratio (median ms/epoch); ratio = "
                 f"median of {args.repeats} per-repetition paired ratios")
    cells = {(loop, name): ratio_cell(summaries[name].get(loop)) for name in args.only for loop in args.loops}
    lines += table(args.loops, args.only, cells)
    lines += indexed_lines(against_indexed)
    lines += skipped_notes(skipped_by_workload)
    lines += [""] + memory_lines(summaries, args.loops)
    if extras:
        lines += [""] + extra_lines(extras, args.repeats)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"header": facts, "notes": notes, "table": summaries,
                                         "skipped": skipped_by_workload, "raw": raw, "extras": extras}, indent=1))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
