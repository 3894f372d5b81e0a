"""The digits run with a mid-run test phase, built in Python, plus a callback bound to that phase.

    python examples/digits_test_phase.py
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from phasetrain import Callback, RunConfig, TestPhase, Trainer, every_n_epochs, on_last_epoch


class ReportTest(Callback):
    """Hooks of a custom phase are named after it: on_enter_test / on_exit_test."""

    def on_exit_test(self, trainer: Trainer) -> None:
        accuracy = trainer.run_history.get_latest_metric("test/accuracy")
        print(f"  mid-run test after epoch {trainer.state.epoch}: accuracy {accuracy:.4f}")


def main() -> None:
    config = RunConfig.from_file(pathlib.Path(__file__).with_name("digits.yaml"),
                                 overrides=["run_dir=runs/digits_test_phase_py", "train.epochs=8", "overwrite=true"])
    trainer = Trainer(config)
    # Every 2 epochs, but not after the last one (the done phase evaluates the test set anyway).
    trainer.add_phase(TestPhase(), after="eval_epoch", when=every_n_epochs(2) & ~on_last_epoch())
    trainer.add_callback(ReportTest())
    print(trainer.render_graph())
    trainer.run()


if __name__ == "__main__":
    main()
