"""Phase handlers: what runs inside each node of the graph.

Each handler is one screen; the batch loops are plain Python over a plain DataLoader and the
accelerate-prepared model and optimizer. No machine transition, ``.item()`` or other device sync
happens per batch unless a log or checkpoint is due.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from phasetrain.conditions import Condition, every_n_epochs
from phasetrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from phasetrain.config import PhaseSpec, RunConfig
    from phasetrain.graph import PhaseGraph
    from phasetrain.trainer import Trainer


class Phase:
    """A node of the phase graph: a name and a handler that receives the trainer.

    Subclass it, set ``name`` and implement ``run``; add it with ``trainer.add_phase(phase, after=...)``.
    ``when`` is the condition used when ``add_phase`` is given none (None: every time). ``check`` runs
    when the phase is added, to refuse a phase that cannot work with this trainer before training.

    Example::

        class Unfreeze(Phase):
            name = "unfreeze"
            when = on_epoch(3)  # phasetrain.conditions.on_epoch
            def run(self, trainer):
                for p in trainer.model.parameters():
                    p.requires_grad_(True)
    """

    name: str = ""
    when: Condition | None = None

    def run(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def check(self, trainer: Trainer) -> None:
        """Raise a PhasetrainError if this phase cannot run with ``trainer``."""

    def state_dict(self) -> dict[str, Any]:
        """State a checkpoint must keep for an exact resume (counters, anything the phase changed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SetupPhase(Phase):
    """Checks that model and loss fit the data, then claims the run folder and writes the resolved config."""

    name = "setup"

    def run(self, trainer: Trainer) -> None:
        trainer.check_model_fits_loss()  # first: a failed check leaves the run folder untouched
        trainer.run_folder.claim(trainer.config)


class TrainEpochPhase(Phase):
    """One epoch of optimizer steps, with gradient accumulation; resumes mid-epoch from ``batch_in_epoch``."""

    name = "train_epoch"

    def run(self, trainer: Trainer) -> None:
        state, cfg = trainer.state, trainer.config.train
        model, fire = trainer.model, trainer.callbacks.fire
        model.train()
        loader = trainer.train_loader(skip_batches=state.batch_in_epoch)
        total_batches = trainer.train_batches
        accum = cfg.grad_accum_steps
        log_every = cfg.log_every_steps
        distributed = trainer.accelerator.num_processes > 1
        epoch_loss = LossSum(float(state.train_loss_sum), trainer.device)
        state.train_loss_sum = epoch_loss  # a checkpoint reads it with float()
        step_loss = torch.zeros((), device=trainer.device)

        def finish_step(loss: torch.Tensor) -> None:
            trainer.clip_gradients()
            trainer.optimizer_step()
            trainer.scheduler_step(interval="step")
            trainer.optimizer_zero_grad()
            state.optimizer_step += 1
            state.micro_step = 0
            fire("on_train_step_end", trainer, loss)
            if log_every and state.optimizer_step % log_every == 0:
                total = float(epoch_loss)  # sync point, once per log_every steps
                mean = (total - state.logged_loss_sum) / max(state.train_samples - state.logged_samples, 1)
                trainer.log({"train/loss": mean, "train/lr": trainer.learning_rate}, kind="step")
                state.logged_loss_sum, state.logged_samples = total, state.train_samples
            trainer.after_optimizer_step()

        for batch in loader:
            if state.micro_step == 0:
                fire("on_train_step_start", trainer)
            group_start = state.batch_in_epoch - state.micro_step
            # The epoch's last group may be short (unknown for an iterable dataset without a length).
            group_size = min(accum, total_batches - group_start) if total_batches else accum
            last_micro_batch = state.micro_step + 1 == group_size
            batch = trainer.to_device(batch)
            # Skip DDP's gradient all-reduce on all but the last micro-batch of a step.
            sync_context = trainer.accelerator.no_sync(model) if distributed and not last_micro_batch else nullcontext()
            with sync_context:
                output = trainer.calculate_train_batch_loss(batch)
                loss = output["loss"] if group_size == 1 else output["loss"] / group_size
                fire("on_before_backward", trainer, loss)
                trainer.backward_step(loss)
                fire("on_after_backward", trainer)
            detached = output["loss"].detach()
            epoch_loss.add(detached, output["batch_size"])
            if group_size > 1:
                step_loss = detached / group_size if state.micro_step == 0 else step_loss + detached / group_size
            state.train_samples += int(output["batch_size"])
            state.batch_in_epoch += 1
            state.micro_step += 1
            if last_micro_batch:
                finish_step(detached if group_size == 1 else step_loss)
                if state.stop_requested:
                    break
        if state.micro_step:  # an iterable dataset ended inside an accumulation group
            finish_step(step_loss)

        trainer.scheduler_step(interval="epoch")
        mean_loss = trainer.reduce_mean(epoch_loss.total(), state.train_samples)
        trainer.log({"train/loss": mean_loss, "train/lr": trainer.learning_rate}, kind="epoch")


class LossSum:
    """A sample-weighted sum of batch losses that never syncs the device until read.

    Appending the detached loss to a list costs far less than a tensor op per batch (each ~5 us on
    a tiny model); the list is folded into one tensor every ``fold_every`` batches and when read.
    """

    def __init__(self, start: float, device: torch.device, fold_every: int = 256) -> None:
        self._sum = torch.tensor(start, device=device, dtype=torch.float64)
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._fold_every = fold_every

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self._losses.append(loss)
        self._sizes.append(batch_size)
        if len(self._losses) >= self._fold_every:
            self.total()

    def total(self) -> torch.Tensor:
        if self._losses:
            losses = torch.stack(self._losses).double()
            if len(set(self._sizes)) == 1:  # the usual case: no host-to-device copy of the sizes
                self._sum += losses.sum() * self._sizes[0]
            else:
                self._sum += (losses * torch.tensor(self._sizes, dtype=torch.float64).to(losses.device)).sum()
            self._losses.clear()
            self._sizes.clear()
        return self._sum

    def __float__(self) -> float:
        return self.total().item()  # sync point


class EvalEpochPhase(Phase):
    """Loss and metrics over the eval set, logged as ``eval/...``."""

    name = "eval_epoch"

    def run(self, trainer: Trainer) -> None:
        assert trainer.eval_data is not None  # the eval_due condition checks this
        results = trainer.evaluate_dataset(trainer.eval_data, progress=True)
        trainer.log({f"eval/{k}": v for k, v in results.items()}, kind="epoch")


class CheckpointPhase(Phase):
    """Saves a checkpoint of the whole run at an epoch boundary."""

    name = "checkpoint"

    def run(self, trainer: Trainer) -> None:
        # Saving is this phase's whole work: the checkpoint records it as done, so a resume goes on to
        # the next phase instead of writing the same checkpoint again.
        trainer.state.phase_complete = True
        trainer.save_checkpoint()


class DonePhase(Phase):
    """Evaluates the test set if there is one and writes the final weights to ``RUN_DIR/model.safetensors``."""

    name = "done"

    def run(self, trainer: Trainer) -> None:
        if trainer.test_data is not None:
            results = trainer.evaluate_dataset(trainer.test_data)
            trainer.log({f"test/{k}": v for k, v in results.items()}, kind="epoch")
        trainer.run_folder.write_final_weights(trainer.accelerator, trainer.model)


class TestPhase(Phase):
    """A mid-run evaluation of a held-out set, logged as ``<name>/loss``, ``<name>/accuracy``, ...

    ``dataset`` defaults to the data's ``test`` split; ``every`` sets the default condition
    (``every_n_epochs(every)``). In a config::

        phases:
          - {target: "phasetrain:TestPhase", args: {every: 2}, after: eval_epoch}
    """

    __test__ = False  # not a pytest test class

    def __init__(self, dataset: Any = None, every: int = 1, name: str = "test") -> None:
        self.dataset = dataset
        self.name = name
        self.when = every_n_epochs(every)

    def check(self, trainer: Trainer) -> None:
        if self._dataset(trainer) is None:
            raise DataError(f"TestPhase {self.name!r} has no dataset: pass TestPhase(dataset) or return a "
                            "'test' split from the config's data")

    def _dataset(self, trainer: Trainer) -> Any:
        return self.dataset if self.dataset is not None else trainer.test_data

    def run(self, trainer: Trainer) -> None:
        results = trainer.evaluate_dataset(self._dataset(trainer))
        trainer.log({f"{self.name}/{k}": v for k, v in results.items()}, kind="epoch")


def default_phases() -> dict[str, Phase]:
    phases: list[Phase] = [SetupPhase(), TrainEpochPhase(), EvalEpochPhase(), CheckpointPhase(), DonePhase()]
    return {phase.name: phase for phase in phases}


def build_phase(spec: PhaseSpec, index: int) -> tuple[Phase, str, Condition | None, str | None]:
    """A config ``phases[index]`` entry as ``add_phase`` arguments."""
    from phasetrain.conditions import condition_from_config
    phase = spec.build(what=f"phases[{index}]")
    if not isinstance(phase, Phase):
        raise ConfigError(f"phases[{index}]: {spec.target} built a {type(phase).__name__}, expected a phasetrain.Phase")
    when = condition_from_config(spec.when, f"phases[{index}].when") if spec.when is not None else None
    return phase, spec.after, when, spec.then


def graph_from_config(config: RunConfig) -> PhaseGraph:
    """The graph a run of ``config`` walks: the default one plus the config's phases (no model or data built)."""
    from phasetrain.graph import PhaseGraph
    graph = PhaseGraph.default()
    for index, spec in enumerate(config.phases):
        phase, after, when, then = build_phase(spec, index)
        graph.add_phase(phase.name, after, when if when is not None else phase.when, then)
    return graph


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch that is a tuple/list of two or a dict with those keys."""
    if isinstance(batch, dict):
        return batch["inputs"], batch.get("targets")
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None
