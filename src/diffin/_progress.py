"""Progress: one place that decides how it looks and when it shows.

On a terminal, a tqdm bar. Redirected to a log file or a pipe (CI, ``nohup``, ``> log``) a bar
would print nothing useful (tqdm's ``disable=None`` keeps logs free of carriage-return updates),
so long work reports stage lines through :mod:`logging` instead (logger ``diffin.progress``, level
INFO): what runs, how far, and an estimate of the time left, at most every
:data:`LOG_EVERY_SECONDS` seconds, and when it ends. The command line shows them; a library user
sees them after ``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("diffin.progress")

LOG_EVERY_SECONDS = float(os.environ.get("DIFFIN_PROGRESS_SECONDS", "30"))
"""Seconds between two stage lines of one piece of work (environment: ``DIFFIN_PROGRESS_SECONDS``)."""


def progress_bar(total: int | None, desc: str, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar when ``enabled`` and standard error is a terminal; a :class:`StageLog` (a silent
    tqdm that logs stage lines through :mod:`logging`) when ``enabled`` and it is not; a silent bar
    when not ``enabled``."""
    if enabled and not _stderr_is_tty():
        return StageLog(total, desc, unit=str(kw.get("unit", "it")))
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, **kw)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class StageLog(tqdm):
    """Progress of one piece of work as log lines: ``<desc>: started, <total> <unit>s``, then
    ``<desc>: <n>/<total> <unit>s (p%), <elapsed> elapsed, about <left> left`` at most every
    :data:`LOG_EVERY_SECONDS` seconds, and ``<desc>: done, <n> <unit>s in <elapsed>`` at
    :meth:`close`. A disabled tqdm otherwise (it draws nothing), so callers hold one type."""

    def __init__(self, total: int | None, desc: str, unit: str = "it",
                 every: float | None = None, clock: Any = time.monotonic) -> None:
        super().__init__(total=total, desc=desc, unit=unit, disable=True)
        self.desc = desc
        self.unit = unit
        self.every = LOG_EVERY_SECONDS if every is None else every
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False
        log.info("%s: started%s", desc, f", {total} {unit}s" if total else "")

    def update(self, n: float | None = 1) -> bool | None:
        self.n += n or 0
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line(now))
        return None

    def line(self, now: float | None = None) -> str:
        """The stage line at ``now`` (default: the clock now)."""
        elapsed = (self._clock() if now is None else now) - self._start
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}s, {duration(elapsed)} elapsed"
        frac = min(self.n / self.total, 1.0)
        left = f", about {duration(elapsed * (1 - frac) / frac)} left" if frac > 0 else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({frac:.0%}), "
                f"{duration(elapsed)} elapsed{left}")

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        log.info("%s: done, %d %ss in %s", self.desc, self.n, self.unit, duration(self._clock() - self._start))
