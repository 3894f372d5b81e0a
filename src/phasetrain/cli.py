"""The command line: ``phasetrain run | resume | graph | plan | plot | report | evaluate | predict`` (also
``python -m phasetrain``).

Errors of the user's input or machine (a bad config, a full disk, a busy run folder) print one
``phasetrain: error: ...`` line and exit 2; a stop signal exits 130 (SIGINT) or 143 (SIGTERM) after its
checkpoint; phasetrain's warnings print as one ``phasetrain: warning: ...`` line each.
"""
from __future__ import annotations

import argparse
import errno
import pathlib
import sys
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from phasetrain.errors import PhasetrainError
from phasetrain.launch import LOST_PROCESS_EXIT, is_main_process, launched_processes, which_process

if TYPE_CHECKING:
    from phasetrain.signals import RunInterrupted


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    commands_by_name = {"run": _run, "resume": _resume, "graph": _graph, "plan": _plan, "plot": _plot,
                        "report": _report, "evaluate": _evaluate, "predict": _predict}
    with warnings.catch_warnings(), _signals_caught_early(args.command in ("run", "resume")):
        warnings.showwarning = _show_warning
        try:
            return commands_by_name[args.command](args)
        except PhasetrainError as exc:
            _say(f"phasetrain: error: {which_process()}{exc}")
            return 2
        except OSError as exc:
            if exc.errno not in _PATH_ERRORS:
                raise
            _say(f"phasetrain: error: {exc.strerror}: {exc.filename}")
            return 2
        except _interrupted() as exc:
            if is_main_process():  # every process saved its part of the one checkpoint: one line says so
                _say(f"phasetrain: {exc}")
            return exc.exit_code
        except RuntimeError as exc:
            lost = _lost_process(exc)
            if lost is None:
                raise
            _say(f"phasetrain: error: {which_process()}{lost}")
            return LOST_PROCESS_EXIT
        except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed (or a second one)
            _say("phasetrain: interrupted (SIGINT) before a checkpoint could be written; whatever was saved before "
                 "is intact")
            return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phasetrain", description="Train PyTorch models by walking a phase graph.")
    parser.add_argument("--version", action="version", version=f"phasetrain {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="train from a YAML/JSON config",
                              description="Train from a config file; key=value overrides use dotted keys.")
    run.add_argument("config", type=pathlib.Path, help="YAML or JSON run config")
    run.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.epochs=3 run_dir=runs/x")
    _add_num_processes(run)
    resume = commands.add_parser("resume", help="continue an interrupted run from its folder",
                                 description="Continue a run from its latest intact checkpoint (or --checkpoint).")
    resume.add_argument("run_dir", type=pathlib.Path, help="the run folder (holds config.yaml and checkpoints/)")
    resume.add_argument("--checkpoint", default="latest",
                        help="a checkpoint folder, or its name in RUN_DIR/checkpoints; default: latest intact")
    resume.add_argument("--from-other-run", action="store_true",
                        help="allow --checkpoint to name another run folder's checkpoint (continue from it here)")
    resume.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config changes; applied where the checkpoint allows (e.g. train.epochs=12), "
                             "refused otherwise")
    _add_num_processes(resume)
    graph = commands.add_parser("graph", help="draw the phase graph of a config or a run folder",
                                description="Draw the phase graph. For a run folder, the phase the run is in "
                                            "or stopped in is highlighted.")
    graph.add_argument("source", type=pathlib.Path, help="a YAML/JSON config, or a run folder")
    graph.add_argument("--format", choices=("mermaid", "dot", "svg", "png"), default=None,
                       help="default: from -o's suffix, else mermaid")
    graph.add_argument("-o", "--output", type=pathlib.Path, help="write to this file instead of stdout")
    graph.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, as for run")
    plan = commands.add_parser("plan", help="print the phases a run will walk, without training",
                               description="Print, epoch by epoch, the phases the run will walk and why. Builds "
                                           "the data (for the step count), but no model, optimizer or Accelerator.")
    plan.add_argument("source", type=pathlib.Path, help="a YAML/JSON config, or a run folder")
    plan.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.epochs=6")
    plot = _run_file_command(commands, "plot", "draw a run's curves and phase timeline (needs phasetrain[plot])",
                             "Draw loss and metric curves by optimizer step (step and epoch records, train and eval "
                             "on shared axes) and the phase timeline, with matplotlib.")
    plot.add_argument("--metrics", default=None, metavar="NAME,...",
                      help="only these curves, as named in metrics.jsonl (e.g. eval/loss,eval/accuracy)")
    _run_file_command(commands, "report", "write a run's report: one self-contained HTML page",
                      "Write one HTML page (no network, no script) with the run's config, phase graph, curves, "
                      "phase timeline, checkpoints and final metrics.")
    evaluate = _use_command(commands, "evaluate", "print the loss and metrics of a trained run on a split",
                            "Evaluate the run's model with its trained weights on a split of its data: the loss and "
                            "every metric of its config. Writes nothing.")
    evaluate.add_argument("--json", action="store_true", help="print the results as one JSON object")
    predict = _use_command(commands, "predict", "write a trained run's outputs for a split, in dataset order",
                           "Write the model's outputs for every sample of a split, in dataset order.")
    predict.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path(PREDICTIONS[0]),
                         help=f"a {'/'.join(PREDICTIONS[1])} file (default: {PREDICTIONS[0]} here)")
    return parser


#: predict's default output and the suffixes -o takes.
PREDICTIONS = ("predictions.pt", (".pt", ".npy", ".csv"))


def _use_command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=description)
    command.add_argument("run_dir", type=pathlib.Path, help="the run folder (holds config.yaml and the weights)")
    command.add_argument("--split", default="test", help="test (default), eval or train")
    command.add_argument("--weights", default="final",
                         help="final (default), best, latest, ema, or a checkpoint's name or folder")
    command.add_argument("--batch-size", type=int, metavar="N", default=None,
                         help="evaluation batch size per process (default: the run's)")
    _add_num_processes(command)
    return command


#: The file each command that reads a run folder writes: its default name in RUN_DIR, and the suffixes -o takes.
RUN_FILES = {"plot": ("curves.png", (".png", ".svg", ".pdf")), "report": ("report.html", (".html", ".htm"))}


def _run_file_command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    default_name, suffixes = RUN_FILES[name]
    command: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=description)
    command.add_argument("run_dir", type=pathlib.Path, help="the run folder (holds metrics.jsonl)")
    command.add_argument("-o", "--output", type=pathlib.Path, default=None,
                         help=f"a {'/'.join(suffixes)} file (default: RUN_DIR/{default_name})")
    return command


def _add_num_processes(command: argparse.ArgumentParser) -> None:
    command.add_argument("--num-processes", type=int, metavar="N", default=None,
                         help="train on N local processes, started by torch's elastic launcher (torchrun): one per "
                              "GPU, or N CPU processes (gloo) on a machine without GPUs; see docs/distributed.md")


def _launch_instead(args: argparse.Namespace, folder: Any, lock: bool = True) -> int | None:
    """With ``--num-processes N`` (N > 1, outside a launch): run this very command on N processes through
    torch's launcher, after the checks that need no process (the config, the run folder, its lock) passed
    here once. Each process gets the same arguments; ``--num-processes N`` inside a launch of N is accepted."""
    from phasetrain import launch
    if args.num_processes is None or launch.in_launch() or args.num_processes == 1:
        return None
    if lock:
        with folder.locked():  # a folder in use: one line now, not one from a process while the others wait
            pass
    return launch.launch(args.num_processes, sys.argv[1:], folder.path)


def _run(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.launch import check_command
    from phasetrain.run_folder import RunFolder
    check_command(args.num_processes)
    ensure_importable_cwd()
    config = RunConfig.from_file(args.config, overrides=args.overrides)
    folder = RunFolder(config.run_dir, is_main_process())
    if not config.train.fast_dev_run:  # it writes to a throwaway folder: run_dir is neither checked nor locked
        folder.refuse_if_occupied(config)  # in a blink, before the model, the data and the dry run are built
    launched = _launch_instead(args, folder, lock=not config.train.fast_dev_run)
    if launched is not None:
        return launched
    with nullcontext() if config.train.fast_dev_run else folder.locked():
        _train(config, resume=None)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.errors import RunDirError
    from phasetrain.launch import check_command
    from phasetrain.run_folder import RunFolder
    check_command(args.num_processes)
    ensure_importable_cwd()
    folder = RunFolder(args.run_dir, is_main_process())
    if not folder.config_file.is_file():
        raise RunDirError(f"{args.run_dir} is not a run folder: it has no {folder.config_file.name}")
    if folder.finished:  # answered without building the run
        print(f"run {args.run_dir} is finished ({folder.final_weights.name} written); nothing to resume")
        return 0
    fixed = [o for o in args.overrides if o.partition("=")[0].strip() in ("run_dir", "overwrite")]
    if fixed:
        raise RunDirError(f"{', '.join(fixed)}: a resume continues the run in its own folder, {args.run_dir}; "
                          "to start elsewhere from one of its checkpoints, use 'phasetrain resume OTHER_DIR "
                          "--checkpoint CHECKPOINT --from-other-run'")
    config = RunConfig.from_file(folder.config_file, overrides=args.overrides)
    config.run_dir = args.run_dir  # set, not parsed: a folder named like a date or a number stays a path
    missing = [name for name in ("model", "data") if getattr(config, name) is None]
    if missing:
        raise RunDirError(f"{args.run_dir} was trained from Python objects (its config.yaml names no "
                          f"{' and no '.join(missing)}), so the command line cannot rebuild it; resume it from "
                          "Python with the same objects: Trainer(config, model=..., ...).run(resume='latest')")
    launched = _launch_instead(args, folder)
    if launched is not None:
        return launched
    with folder.locked():
        _train(config, resume=args.checkpoint, from_other_run=args.from_other_run)
    return 0


def _train(config: Any, resume: str | None, from_other_run: bool = False) -> None:
    from phasetrain.errors import RunDirError
    from phasetrain.trainer import Trainer
    try:
        Trainer(config).run(resume=resume, from_other_run=from_other_run)
    except OSError as exc:
        if exc.errno not in _FULL_OR_READ_ONLY:
            raise
        raise RunDirError(f"{exc.strerror} writing {exc.filename or 'into ' + str(config.run_dir)}; what was "
                          f"saved before is intact: fix this, then continue with 'phasetrain resume {config.run_dir}'"
                          ) from exc


def _graph(args: argparse.Namespace) -> int:
    from phasetrain import render
    from phasetrain.errors import RunDirError
    from phasetrain.graph import FIRST
    from phasetrain.run_folder import RunFolder
    highlight: str | None = None
    if args.source.is_dir():
        # A run folder is drawn from the graph its run stored, importing nothing: drawing must not run
        # the code its config names (and phases added in Python appear, which the config cannot name).
        folder = RunFolder(args.source)
        if args.overrides:
            raise RunDirError(f"overrides {args.overrides} given with run folder {folder.path}: a run's graph is "
                              "the one it ran with; give a config file to draw it with overrides")
        if not folder.graph_file.is_file():
            raise RunDirError(f"run folder {folder.path} has no {folder.graph_file.name} (it was written by an older "
                              "phasetrain, or its run failed before setup finished); draw the graph from its config, "
                              f"which imports the config's phases: phasetrain graph {folder.config_file}")
        graph, highlight = render.GraphView.read(folder.graph_file), folder.position()[0] or FIRST
    else:  # a config is code: drawing it builds its phases (no model or data)
        from phasetrain.config import RunConfig, ensure_importable_cwd
        from phasetrain.graph import build_graph
        ensure_importable_cwd()
        graph = render.describe(build_graph(RunConfig.from_file(args.source, overrides=args.overrides)))
    fmt = args.format or (render.format_of(args.output) if args.output else "mermaid")
    if args.output:
        if not args.output.parent.is_dir():
            raise RunDirError(f"cannot write {args.output}: folder {args.output.parent} does not exist")
        render.write(graph, args.output, fmt, highlight)
        print(f"wrote {args.output}")
        return 0
    content = render.render(graph, fmt, highlight)
    if isinstance(content, bytes):
        sys.stdout.buffer.write(content)
    else:
        sys.stdout.write(content)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from phasetrain.config import ensure_importable_cwd
    from phasetrain.plan import plan_source
    ensure_importable_cwd()
    print(plan_source(args.source, args.overrides))
    return 0


def _plot(args: argparse.Namespace) -> int:
    output = _output(args)  # before matplotlib and torch are imported: a wrong argument is answered at once
    from phasetrain.plot import plot_run
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    plot_run(args.run_dir, output, metrics)
    print(f"wrote {output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    output = _output(args)
    from phasetrain.report import write_report
    write_report(args.run_dir, output)
    print(f"wrote {output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    run, launched = _run_to_use(args)
    if launched is not None:
        return launched
    from phasetrain.runs import evaluate_run
    results = evaluate_run(run, args.split, args.weights, args.batch_size)
    if is_main_process():
        import json
        print(json.dumps(results) if args.json else "  ".join(f"{name} {value:.4f}" for name, value in results.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from phasetrain.errors import RunDirError
    output, suffixes = args.output, PREDICTIONS[1]
    if output.suffix.lower() not in suffixes:
        raise RunDirError(f"-o {output}: the file name must end in {', '.join(suffixes)}")
    if output.is_dir() or not output.parent.is_dir():
        raise RunDirError(f"cannot write {output}: {'it is a folder' if output.is_dir() else 'its folder does not exist'}")
    run, launched = _run_to_use(args)
    if launched is not None:
        return launched
    from phasetrain.runs import predict_run, write_predictions
    outputs = predict_run(run, args.split, args.weights, args.batch_size)
    if is_main_process():
        write_predictions(outputs, output)
        import torch
        counted = f"the outputs for {len(outputs)} {args.split} samples" if isinstance(outputs, torch.Tensor) else \
            f"the {args.split} split's outputs"
        print(f"wrote {output}: {counted}")
    return 0


def _run_to_use(args: argparse.Namespace) -> tuple[Any, int | None]:
    """The run evaluate/predict read, its weights checked before torch is imported for the work; and, with
    ``--num-processes N`` outside a launch, the exit status of the same command run on N processes."""
    from phasetrain.config import ensure_importable_cwd
    from phasetrain.launch import check_command
    from phasetrain.runs import load_run
    check_command(args.num_processes)
    ensure_importable_cwd()
    from phasetrain.errors import ConfigError
    from phasetrain.runs import SPLITS
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a number of samples >= 1")
    if args.split not in SPLITS:
        raise ConfigError(f"--split {args.split}: expected one of {', '.join(SPLITS)}")
    run = load_run(args.run_dir)
    run.weights_file(args.weights)
    from phasetrain.run_folder import RunFolder
    return run, _launch_instead(args, RunFolder(run.path), lock=False)


def _output(args: argparse.Namespace) -> pathlib.Path:
    """Where a command that reads ``args.run_dir`` writes its file: ``-o``, else its default in the run folder."""
    from phasetrain.errors import RunDirError
    run_dir, (default_name, suffixes) = args.run_dir, RUN_FILES[args.command]
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder: give the folder of a run (its run_dir)")
    output = args.output or run_dir / default_name
    if output.is_dir():
        raise RunDirError(f"-o {output} is a folder: give a file name, e.g. {output / default_name}")
    if output.suffix.lower() not in suffixes:
        raise RunDirError(f"-o {output}: the file name must end in {', '.join(suffixes)}")
    if not output.parent.is_dir():
        raise RunDirError(f"cannot write {output}: folder {output.parent} does not exist")
    return output


def _signals_caught_early(training: bool) -> AbstractContextManager[None]:
    # A signal while torch imports and the run is built: a checkpoint after setup, not a traceback.
    from phasetrain.signals import caught_early  # imports no torch
    return caught_early() if training else nullcontext()


def _lost_process(error: RuntimeError) -> str | None:
    """One line for a collective that failed because another process of the run died (that process's own
    error, or the launcher, says why); None for any other error, which keeps its traceback."""
    import torch.distributed as dist
    if launched_processes() == 1:
        return None
    first_line = str(error).splitlines()[0] if str(error) else ""
    peer_gone = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    if not isinstance(error, dist.DistNetworkError) and not any(text in first_line for text in peer_gone):
        return None
    # gloo's message: "[.../pair.cc:537] Read error [127.0.0.1]:54961: Connection reset by peer. This is ..."
    what = first_line.split("] ", 1)[-1].split(". ")[0]
    return f"another process of the run stopped answering ({what}); its own error, or the launcher, says why"


def _say(line: str) -> None:
    """One line on stderr, in one write: the processes of a launch share the terminal, and a line written in
    two parts (text, then newline) gets another process's line glued to it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


#: Write errors that are about the machine, not a bug: one line naming the run folder, exit 2.
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

#: A path the user gave that the system refuses (too long, not a folder, not allowed): one line, exit 2.
_PATH_ERRORS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP, errno.EROFS}


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """phasetrain's own warnings as one ``phasetrain: warning: ...`` line; others as Python shows them."""
    if pathlib.Path(filename).resolve().is_relative_to(pathlib.Path(__file__).parent):
        if is_main_process():  # the same on every process of a launch (one that is not says so on the main one)
            _say(f"phasetrain: warning: {' '.join(str(message).split())}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _version() -> str:
    from phasetrain import __version__
    return __version__


def _interrupted() -> type[RunInterrupted]:
    from phasetrain.signals import RunInterrupted
    return RunInterrupted


if __name__ == "__main__":
    sys.exit(main())
