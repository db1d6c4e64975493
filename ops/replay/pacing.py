"""When each replayed event is sent: as fast as possible, at a fixed rate, or at the stream's own
timestamps scaled by a factor. Clock and sleep are injected so tests run on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Pacer:
    rate: float | None = None  # events per second
    time_scale: float | None = None  # stream seconds per wall second
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    max_lag_s: float = field(default=0.0, init=False)
    _start: float | None = field(default=None, init=False)
    _first_ts: float | None = field(default=None, init=False)
    _count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rate is not None and self.time_scale is not None:
            raise ValueError("choose one pacing: --rate or --time-scale, not both")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be positive, got {self.rate}")
        if self.time_scale is not None and self.time_scale <= 0:
            raise ValueError(f"--time-scale must be positive, got {self.time_scale}")

    @property
    def mode(self) -> str:
        if self.rate is not None:
            return f"fixed rate {self.rate:g} events/s"
        if self.time_scale is not None:
            return f"stream timestamps x{self.time_scale:g}"
        return "as fast as possible"

    def wait(self, ts: float) -> None:
        """Block until the event stamped ``ts`` is due; records how far behind schedule we ran."""
        now = self.clock()
        if self._start is None:
            self._start, self._first_ts = now, ts
        if self.rate is not None:
            due = self._start + self._count / self.rate
        elif self.time_scale is not None:
            assert self._first_ts is not None
            due = self._start + max(0.0, ts - self._first_ts) / self.time_scale
        else:
            due = now
        self._count += 1
        if due > now:
            self.sleep(due - now)
        else:
            self.max_lag_s = max(self.max_lag_s, now - due)
