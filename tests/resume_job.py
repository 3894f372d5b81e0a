"""The phasetrain CLI in its own process, for the kill/resume tests: ``python -m tests.resume_job ARGS...``.

PHASETRAIN_TEST_CRASH_IN_SAVE=N makes the N-th checkpoint write of this process die by SIGKILL halfway
through (after the weights, before the manifest), the way a power cut or an OOM kill would.
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys
from typing import Any

import torch

from phasetrain import checkpoint_files
from phasetrain.cli import main


def crash_in_nth_save(n: int) -> None:
    original = checkpoint_files._write_manifest
    calls = {"count": 0}

    def write_half_then_die(folder: pathlib.Path, files: dict[str, Any]) -> None:
        calls["count"] += 1
        if calls["count"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        original(folder, files)

    checkpoint_files._write_manifest = write_half_then_die


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("PHASETRAIN_TEST_CRASH_IN_SAVE"):
        crash_in_nth_save(int(os.environ["PHASETRAIN_TEST_CRASH_IN_SAVE"]))
    sys.exit(main(sys.argv[1:]))
