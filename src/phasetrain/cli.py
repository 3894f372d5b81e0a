"""``phasetrain run CONFIG [key=value ...]`` and ``phasetrain resume RUN_DIR``."""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from phasetrain.errors import PhasetrainError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phasetrain", description="Train PyTorch models by walking a phase graph.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="train from a YAML/JSON config",
                              description="Train from a config file; key=value overrides use dotted keys.")
    run.add_argument("config", type=pathlib.Path, help="YAML or JSON run config")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 run_dir=runs/x")
    resume = commands.add_parser("resume", help="continue an interrupted run from its folder",
                                 description="Continue a run from its latest intact checkpoint (or --checkpoint).")
    resume.add_argument("run_dir", type=pathlib.Path, help="the run folder (holds config.yaml and checkpoints/)")
    resume.add_argument("--checkpoint", default="latest", help="a checkpoint folder; default: latest intact")
    graph = commands.add_parser("graph", help="draw the phase graph of a config or a run folder",
                                description="Draw the phase graph. For a run folder, the phase the run is in "
                                            "or stopped in is highlighted.")
    graph.add_argument("source", type=pathlib.Path, help="a YAML/JSON config, or a run folder")
    graph.add_argument("--format", choices=("mermaid", "dot", "svg", "png"), default=None,
                       help="default: from -o's suffix, else mermaid")
    graph.add_argument("-o", "--output", type=pathlib.Path, help="write to this file instead of stdout")
    graph.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for run")
    plan = commands.add_parser("plan", help="print the phases a run will walk, without training",
                               description="Print, epoch by epoch, the phases the run will walk and why. Builds "
                                           "the data (for the step count), but no model, optimizer or Accelerator.")
    plan.add_argument("source", type=pathlib.Path, help="a YAML/JSON config, or a run folder")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=6")
    args = parser.parse_args(argv)
    commands_by_name = {"run": _run, "resume": _resume, "graph": _graph, "plan": _plan}
    try:
        return commands_by_name[args.command](args)
    except PhasetrainError as exc:
        print(f"phasetrain: error: {exc}", file=sys.stderr)
        return 2
    except _interrupted() as exc:
        print(f"phasetrain: {exc}", file=sys.stderr)
        return 143


def _run(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    ensure_importable_cwd()
    _train(RunConfig.from_file(args.config, overrides=args.overrides), resume=None)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.errors import RunDirError
    from phasetrain.run_folder import RunFolder
    ensure_importable_cwd()
    folder = RunFolder(args.run_dir)
    if not folder.config_file.is_file():
        raise RunDirError(f"{args.run_dir} is not a run folder: it has no {folder.config_file.name}")
    if folder.finished:  # answered without building the run
        print(f"run {args.run_dir} is finished ({folder.final_weights.name} written); nothing to resume")
        return 0
    config = RunConfig.from_file(folder.config_file)
    config.run_dir = args.run_dir  # set, not parsed: a folder named like a date or a number stays a path
    _train(config, resume=args.checkpoint)
    return 0


def _train(config: Any, resume: str | None) -> None:
    from phasetrain.trainer import Trainer
    Trainer(config).run(resume=resume)


def _graph(args: argparse.Namespace) -> int:
    from phasetrain import render
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.errors import RunDirError
    from phasetrain.graph import FIRST, build_graph
    from phasetrain.run_folder import RunFolder
    ensure_importable_cwd()
    folder = RunFolder(args.source) if args.source.is_dir() else None
    config = RunConfig.from_file(folder.config_file if folder else args.source, overrides=args.overrides)
    graph = build_graph(config)  # no model or data needed to draw
    highlight = (folder.position()[0] or FIRST) if folder else None
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


def _interrupted() -> type[Exception]:
    from phasetrain.signals import RunInterrupted
    return RunInterrupted


if __name__ == "__main__":
    sys.exit(main())
