"""Where a run's time goes: how long each phase visit took, and how fast the train loop steps.

Only host clocks are read, so timing adds no device sync, and nothing at all to an optimizer step that
logs nothing. Step and train epoch records read the clock just after their loss was read with
``.item()`` (the device is in sync then). A phase visit ends after its exit hooks: the built-in phases
have synchronised by then, but GPU work a phase of one's own leaves queued counts towards the next.

Timings go into a record's ``"time"`` entry, never among its metrics: they differ from run to run while
the metrics of a resumed run are bitwise the uninterrupted run's. A phase visit is a ``kind: "phase"``
record logged when the visit ends, so a visit cut off by a kill is not counted twice: the resumed run
re-enters that phase and logs its visit then.
"""
from __future__ import annotations

import time
from collections.abc import Mapping


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

    ``samples`` is this process's count; the rate counts every process, which train equal shards. A span
    without samples (a ``train_epoch`` of one's own that hands the trainer only its losses) has no
    samples per second.
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
            rates |= {"steps_per_s": round(steps_done / seconds, 3), "step_s": round(seconds / steps_done, 6)}
        if seconds > 0 and samples > samples_then:
            rates["samples_per_s"] = round((samples - samples_then) * self._num_processes / seconds, 3)
        return rates


def shares(seconds: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(phase, seconds, percent of the whole) for each phase, the largest first."""
    total = sum(seconds.values()) or 1.0
    return [(phase, s, 100 * s / total) for phase, s in sorted(seconds.items(), key=lambda item: -item[1])]
