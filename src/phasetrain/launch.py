"""Where this process stands in a launch, and ``phasetrain run/resume --num-processes N``.

The launch facts (how many processes, which one this is) come from the variables every launcher sets
(``WORLD_SIZE``, ``RANK``: torchrun, ``accelerate launch``, Slurm through either); this module reads them
for the whole package and imports no torch, so the command line can ask before torch is loaded.

``--num-processes N`` spawns nothing itself: the command line is handed to ``torch.distributed.run`` (what
the ``torchrun`` command runs) with a standalone rendezvous, exactly as ``torchrun --standalone
--nproc_per_node N -m phasetrain ...`` would. Each process then finds itself in a launch and
``phasetrain.accelerator`` joins them: one per GPU when the machine has GPUs, gloo on the CPU otherwise.
When one process fails, the launcher stops the others (SIGTERM, then SIGKILL after ``SHUTDOWN_SECONDS``);
this module turns its report into the failed process's exit code and, for a process killed by a signal
(which could not say so itself), one line.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

from phasetrain.errors import LaunchError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

#: How long the launcher lets the other processes finish after one failed or a stop signal came, before
#: it kills them: enough for the checkpoint a SIGTERM asks for, and a bound on a hung collective.
SHUTDOWN_SECONDS = 30

#: The exit code of a process whose collective failed because another process of the run died: never
#: the cause of a failed run, so the launcher's report looks past it for the process that did fail.
LOST_PROCESS_EXIT = 75

#: Set by ``--num-processes`` for the processes it starts: the resume command a stopped run suggests.
NUM_PROCESSES_VARIABLE = "PHASETRAIN_NUM_PROCESSES"


def launched_processes() -> int:
    """How many processes the launcher started (its ``WORLD_SIZE``); 1 without a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LaunchError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes; "
                          "launch through torchrun or accelerate launch, which set it") from None


def in_launch() -> bool:
    """Whether a launcher started this process (it sets WORLD_SIZE, 1 included)."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this is the launch's first process (also without a launcher), known before accelerate is imported."""
    return os.environ.get("RANK", "0") == "0"


def which_process() -> str:
    """"process R of N: " in a multi-process launch, where every process prints its own errors; else ""."""
    world_size = launched_processes()
    return f"process {os.environ.get('RANK', '?')} of {world_size}: " if world_size > 1 else ""


def check_srun_without_launcher() -> None:
    """Refuse a task of ``srun --ntasks N`` (N > 1) started without torchrun: no launcher told it it has
    company, so every task would train alone and write the same run folder."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if not in_launch() and tasks.isdigit() and int(tasks) > 1:
        raise LaunchError(f"srun started {tasks} tasks of phasetrain without a launcher, so each would train alone "
                          "in the same run folder: start one torchrun per node (srun --ntasks-per-node 1 torchrun "
                          "--nnodes ... -m phasetrain run ...; see docs/distributed.md, 'Many machines')")


def resume_command(run_dir: object, processes: int) -> str:
    """The command that continues a run stopped in ``run_dir`` by ``processes`` processes."""
    if processes == 1:
        return f"'phasetrain resume {run_dir}'"
    if os.environ.get(NUM_PROCESSES_VARIABLE) == str(processes):
        return f"'phasetrain resume {run_dir} --num-processes {processes}'"
    return f"'phasetrain resume {run_dir}' through the same launcher ({processes} processes)"


def check_command(processes: int | None) -> None:
    """The launch checks of ``phasetrain run/resume [--num-processes N]``, before anything else: no srun tasks
    without a launcher, and a process count this launch and machine can run."""
    check_srun_without_launcher()
    if processes is not None:
        check_process_count(processes)


def check_process_count(processes: int) -> None:
    """Refuse a count below one, another count than the launch this process is in already has, or more
    processes than GPUs on a GPU machine."""
    if processes < 1:
        raise LaunchError(f"--num-processes {processes}: expected 1 or more processes")
    if in_launch():
        world_size = launched_processes()
        if processes != world_size:
            raise LaunchError(f"--num-processes {processes} given inside a launch of {world_size} processes "
                              f"(WORLD_SIZE={world_size}): leave --num-processes out under torchrun or accelerate launch")
        return
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and processes > gpus:
        raise LaunchError(f"--num-processes {processes}, but this machine has {gpus} GPU{'s' if gpus > 1 else ''}: "
                          f"use at most {gpus} (one process per GPU)")


def launch(processes: int, command: list[str], run_dir: object) -> int:
    """Run ``python -m phasetrain COMMAND`` on ``processes`` local processes through torch's elastic launcher;
    returns the exit code to leave with (the failed process's, 0 when all succeeded)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from phasetrain.signals import release_stop_signals
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and say so; share this process's cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    os.environ[NUM_PROCESSES_VARIABLE] = str(processes)
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(processes), "--max_restarts", "0",
                                         "--monitor_interval", "0.5", "-m", "phasetrain", *command])
    # Its start/stop notes and its failure report: a failure is told by the process and below, in one line.
    # torch gives some of its modules' loggers a level of their own, so each is quietened by name.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # From here torch's launcher owns SIGTERM/SIGINT (it installs its handlers before it starts a process and
    # passes them on); one that came while torch was being imported stops here, before any process starts.
    received = release_stop_signals()
    if received is not None:
        print(f"phasetrain: {signal.Signals(received).name} received before any process started; nothing was "
              "written", file=sys.stderr)
        return 128 + received
    try:
        run(args)
    except ChildFailedError as exc:
        return _failed(exc, processes, run_dir)
    except SignalException as exc:  # the launcher got SIGTERM/SIGINT and passed it on to every process
        return 128 + int(exc.sigval)
    return 0


def _failed(error: ChildFailedError, processes: int, run_dir: object) -> int:
    """The exit code of the process that failed (not one that only lost contact with it, nor one the launcher
    itself then stopped); a process killed by a signal gets one line, since it could not say so itself."""
    failures = sorted(error.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    stopped_by_launcher = -signal.SIGTERM
    causes = [(rank, f) for rank, f in failures if f.exitcode not in (LOST_PROCESS_EXIT, stopped_by_launcher)]
    rank, failure = (causes or failures)[0]
    code = failure.exitcode
    if code < 0:
        print(f"phasetrain: error: process {rank} of {processes} was killed by {signal.Signals(-code).name}; the "
              "launcher stopped the others; the checkpoints written before are intact: continue with "
              f"{resume_command(run_dir, processes)}", file=sys.stderr)
        return 128 - code
    return code
