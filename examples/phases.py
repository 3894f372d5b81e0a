"""A phase for the examples: unfreeze every parameter of the model (the start of fine-tuning).

In a config::

    phases:
      - {target: examples.phases:Unfreeze, after: train_epoch, when: {on_epoch: 3}}
"""
from __future__ import annotations

from phasetrain import Phase, Trainer


class Unfreeze(Phase):
    name = "unfreeze"

    def run(self, trainer: Trainer) -> None:
        for parameter in trainer.accelerator.unwrap_model(trainer.model).parameters():
            parameter.requires_grad_(True)
