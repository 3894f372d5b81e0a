"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...) through accelerate's own: the config's
``tracking.log_with`` becomes ``Accelerator(log_with=...)``, and ``TrackerLog`` sends every record of
``metrics.jsonl`` to ``accelerator.log`` at the record's optimizer step, from the main process.

What a tracker receives, per record kind:

- an epoch record: its metrics under their own names (``train/loss``, ``eval/accuracy``), its rates as
  ``time/<name>`` (``time/samples_per_s``, ``time/steps_per_s``, ``time/step_s``);
- a step record: the same under ``step/`` (``step/train/loss``), so step and epoch points never share a tag;
- a phase visit: ``phase_seconds/<phase>``.

The values of one step go to the trackers in one call, when the step's records are all in (at the next
record of another step, at the start of a train epoch, at a checkpoint and at the end): a tracker may
write on every call (TensorBoard flushes its file). A checkpoint sends what waits, so a kill loses nothing
a resume would not send again. The calls are made in the loop's thread, each TensorBoard call ending in
accelerate's flush: on a thread of their own, or without the flush (TensorBoard's writer thread then
writes while the loop runs), the loop was slower on a CPU, as those threads compete for the GIL with the
loop's Python (``benchmarks/overhead.py --tracking tensorboard``; docs/performance.md has the figures).

A resumed run continues the same tracker run where the tracker allows it, without duplicate points:
TensorBoard hides the points at and after the checkpoint's step (``purge_step``), and the values the
checkpoint had logged at that step are sent again; Weights & Biases resumes the run by its saved id and
drops points at steps it has seen; MLflow continues the saved run id (it keeps every point it is sent, so
points logged between the checkpoint and a crash appear twice there).
"""
from __future__ import annotations

import math
import pathlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from phasetrain.callbacks import Callback
from phasetrain.config import TrackingConfig
from phasetrain.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from phasetrain.trainer import Trainer

#: The times of step and epoch records a tracker gets: the rates. A span's length in seconds would be a curve
#: of the log interval, and every scalar costs (TensorBoard: about 40 us each, in the loop).
RATES = ("samples_per_s", "steps_per_s", "step_s")

#: The package each tracker needs, by accelerate's tracker name.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def tracker_names(tracking: TrackingConfig, fast_dev_run: bool) -> list[str]:
    """The trackers this run logs to, each checked to be installed (accelerate would silently drop a missing
    one). A ``fast_dev_run`` logs to none: it writes nothing that outlives it."""
    if fast_dev_run or not tracking.log_with:
        return []
    from accelerate.tracking import get_available_trackers
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in tracking.log_with:
        if name not in available:
            raise ConfigError(f"tracking.log_with names {name!r}, but its package is not installed: "
                              f"pip install {PACKAGES[name]} (or remove {name!r} from tracking.log_with)")
    return list(dict.fromkeys(tracking.log_with))


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """What the trackers get of ``record`` (see the module's docstring); non-finite values are left out."""
    if record["kind"] == "phase":
        values = {f"phase_seconds/{record['phase']}": record.get("time", {}).get("seconds")}  # None: left out
    else:
        prefix = "step/" if record["kind"] == "step" else ""
        values = {f"{prefix}{key}": value for key, value in record.items() if "/" in key}
        values |= {f"{prefix}time/{key}": value for key, value in record.get("time", {}).items() if key in RATES}
    return {key: float(value) for key, value in values.items()
            if isinstance(value, int | float) and math.isfinite(value)}


class TrackerLog(Callback):
    """Logs every record to the run's ``trackers`` (main process). The trackers start once the run folder is
    claimed (at setup's end, or as a resumed run starts), and end with the run (or its exception, a stop
    signal's included). Every run has one, with no trackers if need be, so a resume may start or stop
    logging to a tracker.

    Its saved state is what a resumed run needs to continue the same tracker runs: the runs' ids, the
    folder they belong to (a checkpoint of another run folder starts new tracker runs, never writes into
    that run's), and the values logged at the latest step.
    """

    def __init__(self, accelerator: Accelerator, trackers: list[str], tracking: TrackingConfig, folder: pathlib.Path,
                 run_name: str, config: dict[str, Any]) -> None:
        self._accelerator, self._trackers, self._tracking, self._config = accelerator, trackers, tracking, config
        self._folder = folder
        self._run_name = tracking.run_name or run_name
        self.ids: dict[str, str] = {}
        self.latest: tuple[int, list[dict[str, float]]] = (-1, [])  # the latest step, and what was logged at it
        self._purge_step: int | None = None  # a resumed run: the checkpoint's optimizer step
        self._started = False
        self._pending: tuple[int, dict[str, float]] = (-1, {})  # values not sent yet, all of one step

    def on_run_start(self, trainer: Trainer) -> None:
        if not (trainer.state.resumed and self._trackers and self._accelerator.is_main_process):
            return
        # The folder is the run's already. Trackers that did not log before the checkpoint (tracking started
        # with this resume, or the checkpoint is another folder's) get the checkpoint's records first.
        logged_before = self.latest[0] >= 0
        self._purge_step = trainer.state.optimizer_step
        self._start()
        if not logged_before:
            for record in checkpoint_records(trainer):
                self._take(record)

    def on_exit_setup(self, trainer: Trainer) -> None:
        self._start()  # the folder is claimed now; the start's time counts as setup's

    def on_enter_train_epoch(self, trainer: Trainer) -> None:
        self._send()  # the previous epoch's records are all in

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not self._trackers or not self._accelerator.is_main_process:
            return
        self._start()
        self._take(record)

    def _take(self, record: dict[str, Any]) -> None:
        values = tracker_values(record)
        step = int(record["step"])
        self.latest = (step, [*self.latest[1], values] if step == self.latest[0] else [values])
        self._queue(step, values)

    def _queue(self, step: int, values: dict[str, float]) -> None:
        # The records of one step go in one call: a tracker may write (TensorBoard flushes) on every call.
        if step != self._pending[0] or not self._pending[1].keys().isdisjoint(values):
            self._send()
        self._pending = (step, {**self._pending[1], **values})

    def _send(self) -> None:
        step, values = self._pending
        self._pending = (-1, {})
        if values:
            self._accelerator.log(values, step=step)

    def _start(self) -> None:
        if self._started or not self._trackers or not self._accelerator.is_main_process:
            return
        self._started = True
        resumed = self._purge_step is not None
        if "wandb" in self._trackers:
            self.ids.setdefault("wandb", uuid.uuid4().hex[:16])
        ours: dict[str, dict[str, Any]] = {
            "tensorboard": {"purge_step": self._purge_step} if resumed else {},
            "wandb": {"name": self._run_name, "id": self.ids.get("wandb"), "resume": "allow", "dir": str(self._folder)},
            "mlflow": {"run_id": self.ids["mlflow"]} if "mlflow" in self.ids else {"run_name": self._run_name},
        }
        kwargs = {name: {**ours.get(name, {}), **self._tracking.init_kwargs.get(name, {})} for name in self._trackers}
        self._folder.mkdir(parents=True, exist_ok=True)
        if resumed and "tensorboard" in self._trackers:
            _after_the_last_event_file(self._folder / self._tracking.project)
        self._accelerator.init_trackers(self._tracking.project, init_kwargs=kwargs)
        if not resumed:  # the config as hyperparameters, once per tracker run: a resumed run is the same run
            for tracker in self._accelerator.trackers:
                # Not TensorBoard's: accelerate writes them as a second TensorBoard run, beside the run's own,
                # with no metrics to compare; the config is in RUN_DIR/config.yaml, next to the events.
                if tracker.name != "tensorboard":
                    tracker.store_init_configuration(flat(self._config))
        if "mlflow" in self._trackers:
            self.ids["mlflow"] = self._accelerator.get_tracker("mlflow").tracker.info.run_id
        step, logged = self.latest
        if resumed and step == self._purge_step:  # hidden by the purge, with whatever followed them
            for values in logged:
                self._queue(step, values)

    def on_run_end(self, trainer: Trainer) -> None:
        self._end()

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._end()

    def _end(self) -> None:
        if self._started:
            self._started = False
            try:
                self._send()
            finally:
                self._accelerator.end_training()  # flushes and closes every tracker's files

    def state_dict(self) -> dict[str, Any]:
        self._send()  # what the checkpoint says was logged is written: a kill after it loses none of it
        return {"folder": str(self._folder.resolve()), "ids": dict(self.ids), "latest_step": self.latest[0],
                "latest": self.latest[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("folder") != str(self._folder.resolve()):  # another run's (or a moved run's) tracker runs
            return
        self.ids = {str(k): str(v) for k, v in state["ids"].items()}
        self.latest = (int(state["latest_step"]), [dict(values) for values in state["latest"]])


def checkpoint_records(trainer: Trainer) -> list[dict[str, Any]]:
    """The records a resumed run's checkpoint holds (``MetricsFile`` keeps them), none without that callback."""
    from phasetrain.callbacks import MetricsFile
    files = [callback for callback in trainer.callbacks if isinstance(callback, MetricsFile)]
    return files[0].logged() if files else []


def _after_the_last_event_file(folder: pathlib.Path) -> None:
    """Wait, if need be, until the clock's second is past the newest TensorBoard event file's.

    TensorBoard reads a folder's event files in name order, and a name starts with its creation time in
    whole seconds, then the host and process id. A resumed run's file made in the same second as the
    stopped run's could sort before it, and the stopped run's points would then be read after the purge
    that hides them. Waiting takes at most a second, and only when a run is resumed within a second.
    """
    stamps = [int(path.name.split(".")[3]) for path in folder.glob("events.out.tfevents.*")
              if path.name.split(".")[3].isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.02)


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as one level of dotted keys with the scalar values trackers take as hyperparameters."""
    values: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            values |= flat(value, f"{prefix}{key}.")
        elif isinstance(value, str | int | float | bool):
            values[f"{prefix}{key}"] = value
        elif value is not None:
            values[f"{prefix}{key}"] = str(value)
    return values
