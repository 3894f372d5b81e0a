"""Freezing and unfreezing parameters by name pattern, as a phase of the graph.

A ``Freeze`` phase sets ``requires_grad`` of the parameters it matches. Put it after ``setup`` for a
backbone frozen from the first epoch, after ``eval_epoch`` with an epoch condition to unfreeze it later::

    phases:
      - {target: "phasetrain.finetuning:Freeze", args: {patterns: ["backbone.*"]}, after: setup}
      - {target: "phasetrain.finetuning:Freeze", args: {patterns: ["backbone.*"], frozen: false},
         after: eval_epoch, when: {on_epoch: 3}}

From Python: ``trainer.add_phase(Freeze("backbone", frozen=False, epoch=3), after="eval_epoch")``.

Which parameters train is saved in every checkpoint (``state.json``'s ``requires_grad``) and restored
on resume, so a run resumed inside the frozen period stays frozen; the phase keeps no state of its own.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from phasetrain.accelerator import bare_model
from phasetrain.callbacks import say
from phasetrain.conditions import on_epoch
from phasetrain.errors import ConfigError
from phasetrain.phases import Phase

if TYPE_CHECKING:
    from phasetrain.trainer import Trainer


class Freeze(Phase):
    """Freeze (``frozen=True``) or unfreeze the parameters that ``patterns`` match.

    A pattern is an ``fnmatch`` pattern matched against the names of ``model.named_parameters()``
    (``"0.*"``, ``"*.bias"``) and against the modules that hold them (``"backbone"`` matches every
    parameter under ``backbone``). One that matches nothing is refused when the trainer is built.
    ``name`` defaults to ``"freeze"``/``"unfreeze"``; ``epoch`` sets the default condition
    (``on_epoch(epoch)``: once, after that epoch), which a config's or ``add_phase``'s ``when`` overrides.

    A frozen parameter gets no gradient, and its ``.grad`` is dropped, so the optimizer skips it
    entirely: no weight decay, no momentum. Its optimizer state (AdamW's moments) is kept and used
    again once it is unfrozen. Unfreezing trains a parameter only if the optimizer holds it, which
    one built from ``model.parameters()`` (as the config's is) does.
    """

    def __init__(self, patterns: str | Sequence[str], frozen: bool = True, name: str | None = None,
                 epoch: int | None = None) -> None:
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        if not self.patterns or not all(isinstance(p, str) for p in self.patterns):
            raise ValueError(f"Freeze patterns must be a non-empty list of name patterns, got {patterns!r}")
        self.frozen = frozen
        self.name = name or ("freeze" if frozen else "unfreeze")
        self.when = on_epoch(epoch) if epoch is not None else None

    def check(self, trainer: Trainer) -> None:
        if trainer.accelerator.num_processes > 1:
            # DistributedDataParallel fixes the parameters it reduces gradients for when it wraps the model:
            # one frozen later stalls its reducer, one unfrozen later trains differently on each process.
            raise ConfigError(f"phase {self.name!r} ({type(self).__name__}) changes which parameters train after "
                              f"the model is wrapped for {trainer.accelerator.num_processes} processes, which "
                              "DistributedDataParallel does not allow; run it in a single process")
        model = bare_model(trainer.accelerator, trainer.model)
        matched = self.matched(model)
        if self.frozen and len(matched) == len(list(model.parameters())):
            raise ConfigError(f"phase {self.name!r}: patterns {self.patterns} match every parameter of the "
                              f"{type(model).__name__} model, so nothing would train (the first backward fails); "
                              "name the modules to freeze, e.g. the backbone's")
        if not self.frozen:
            held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            untrained = [name for name, param in matched if id(param) not in held]
            if untrained:
                raise ConfigError(f"phase {self.name!r} unfreezes {', '.join(untrained[:5])}, which the optimizer does "
                                  "not hold, so they would not train: build the optimizer from all of "
                                  "model.parameters()")

    def matched(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters of ``model`` that the patterns match, by name; a pattern that matches none is refused."""
        params = list(model.named_parameters())
        scopes = {name: _scopes(name) for name, _ in params}
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(scope, pattern) for name, _ in params for scope in scopes[name]):
                names = [name for name, _ in params]
                raise ConfigError(f"phase {self.name!r}: pattern {pattern!r} matches no parameter of the "
                                  f"{type(model).__name__} model; its parameters are {', '.join(names[:8])}"
                                  f"{f', ... ({len(names)} in all)' if len(names) > 8 else ''}")
        return [(name, param) for name, param in params
                if any(fnmatch.fnmatchcase(scope, p) for p in self.patterns for scope in scopes[name])]

    def run(self, trainer: Trainer) -> None:
        matched = self.matched(bare_model(trainer.accelerator, trainer.model))
        for _, param in matched:
            param.requires_grad_(not self.frozen)
            if self.frozen:
                # A gradient left in place (zero_grad(set_to_none=False) leaves zeros) would still be
                # stepped: weight decay and momentum would move the frozen weights.
                param.grad = None
        if trainer.accelerator.is_main_process:
            count = sum(param.numel() for _, param in matched)
            say(f"{self.name}: {len(matched)} parameter tensors ({count:,} values) "
                f"{'frozen' if self.frozen else 'unfrozen'} from epoch {trainer.state.epoch + 1}")


def _scopes(name: str) -> list[str]:
    """``"a.b.weight"`` -> ``["a", "a.b", "a.b.weight"]``: the parameter and the modules that hold it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
