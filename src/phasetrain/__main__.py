"""``python -m phasetrain``: the same command line as ``phasetrain``."""
import os
import sys

# `python -m` puts the working folder first on sys.path, where a folder named like an installed package
# (torchmetrics/) would shadow it; the command line appends it last instead (ensure_importable_cwd).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from phasetrain.cli import main

sys.exit(main())
