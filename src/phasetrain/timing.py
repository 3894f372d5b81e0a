"""Where a run's time goes: how long each phase visit took, and how fast the train loop steps.

Every reading is a host clock read at a point where the device has already been synchronised for
another reason (a record's loss is read with ``.item()`` just before): timing adds no device sync, and
nothing at all to an optimizer step that logs nothing.

Timings go into a record's ``"time"`` entry, never among its metrics: they differ from run to run while
the metrics of a resumed run are bitwise the uninterrupted run's. A phase visit is a ``kind: "phase"``
record logged when the visit ends, so a visit cut off by a kill is not counted twice: the resumed run
re-enters that phase and logs its visit then.
"""
from __future__ import annotations

import time


class PhaseClock:
    """When the current phase visit started: wall-clock time for the timeline, a monotonic clock for its length."""

    def __init__(self) -> None:
        self._started = (0.0, 0.0)

    def enter(self) -> None:
        self._started = (time.time(), time.perf_counter())

    def visit(self) -> dict[str, float]:
        """``start`` (Unix seconds) and ``seconds`` of the visit entered last; the phase's exit hooks count."""
        wall, monotonic = self._started
        return {"start": round(wall, 6), "seconds": round(time.perf_counter() - monotonic, 6)}


class Throughput:
    """Samples and optimizer steps per second over a span of the train loop, read at log points only.

    ``samples`` is this process's count; the rate counts every process, which train equal shards.
    """

    def __init__(self, num_processes: int) -> None:
        self._num_processes = num_processes
        self._since = (time.perf_counter(), 0, 0)

    def start(self, samples: int, steps: int) -> None:
        self._since = (time.perf_counter(), samples, steps)

    def read(self, samples: int, steps: int) -> dict[str, float]:
        """The rates since ``start`` (or the previous read), and start a new span here."""
        then, samples_then, steps_then = self._since
        now = time.perf_counter()
        self._since = (now, samples, steps)
        seconds, steps_done = now - then, steps - steps_then
        rates = {"seconds": round(seconds, 6)}
        if seconds > 0 and steps_done > 0:
            rates |= {"samples_per_s": round((samples - samples_then) * self._num_processes / seconds, 3),
                      "steps_per_s": round(steps_done / seconds, 3), "step_s": round(seconds / steps_done, 6)}
        return rates
