"""``phasetrain run CONFIG [key=value ...]`` and ``phasetrain resume RUN_DIR``."""
from __future__ import annotations

import argparse
import pathlib
import sys

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
    args = parser.parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _resume(args)
    except PhasetrainError as exc:
        print(f"phasetrain: error: {exc}", file=sys.stderr)
        return 2
    except _interrupted() as exc:
        print(f"phasetrain: {exc}", file=sys.stderr)
        return 143


def _run(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.trainer import Trainer
    ensure_importable_cwd()
    config = RunConfig.from_file(args.config, overrides=args.overrides)
    Trainer(config).run()
    return 0


def _resume(args: argparse.Namespace) -> int:
    from phasetrain.config import RunConfig, ensure_importable_cwd
    from phasetrain.errors import RunDirError
    from phasetrain.trainer import Trainer
    ensure_importable_cwd()
    config_file = args.run_dir / "config.yaml"
    if not config_file.is_file():
        raise RunDirError(f"{args.run_dir} is not a run folder: it has no config.yaml")
    config = RunConfig.from_file(config_file, overrides=[f"run_dir={args.run_dir}"])
    Trainer(config).run(resume=args.checkpoint)
    return 0


def _interrupted() -> type[Exception]:
    from phasetrain.checkpoint import RunInterrupted
    return RunInterrupted


if __name__ == "__main__":
    sys.exit(main())
