"""Wall time and resident memory of a block of work: diffin's one memory meter.

The resident set size is read from ``/proc/self/statm`` on Linux. Elsewhere the only portable
reading is ``resource.getrusage``'s ``ru_maxrss``, the largest RSS the process has had so far (a
high-water mark, not the current size): peaks stay right, and a rise is then measured against
the earlier high-water mark, so it is a lower bound. Where neither exists (Windows) memory reads
as NaN and only the time is measured.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

from ._errors import ConfigError


def _proc_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _rusage_peak_mb() -> float | None:
    if resource is None:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mb() -> float:
    """Resident set size of this process in MiB: the current one from ``/proc`` on Linux, the
    high-water mark from ``getrusage`` elsewhere, NaN where neither is available."""
    for read in (_proc_rss_mb, _rusage_peak_mb):
        mb = read()
        if mb is not None:
            return mb
    return math.nan  # pragma: no cover - Windows


class Measure:
    """``with Measure() as m: ...`` → ``m.seconds`` (wall clock), ``m.peak_mb`` (the largest RSS
    in MiB seen while the block ran, polled every ``every`` seconds and read again at the end) and
    ``m.rise_mb`` (peak minus the RSS when the block started). Memory is NaN where the platform
    gives no reading (see the module docstring); ``m.peak_mb_or_none`` is then ``None``.

    The polling thread takes the GIL briefly at each poll: Python-heavy work runs a few percent
    slower under it, so time without it (``poll=False``) where seconds matter most. Polling is
    sampling: a buffer that lives for less than ``every`` seconds (or while a busy machine does not
    schedule the polling thread) can be missed; ``m.polls`` counts the readings taken so far. The
    readings are valid after the block, also when it raised.
    """

    def __init__(self, every: float = 0.01, poll: bool = True) -> None:
        if not every > 0:
            raise ConfigError(f"Measure(every={every!r}): pass a polling interval > 0 seconds")
        self.poll = poll
        self.every = every
        self.start_mb = self.peak_mb = 0.0
        self.seconds = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Measure:
        self.start_mb = self.peak_mb = rss_mb()
        self.polls = 0
        self._stop.clear()
        if self.poll and not math.isnan(self.start_mb):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak_mb = max(self.peak_mb, rss_mb())
            self.polls += 1

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def rise_mb(self) -> float:
        """Peak minus starting RSS, MiB (NaN without a memory reading)."""
        return self.peak_mb - self.start_mb

    @property
    def peak_mb_or_none(self) -> float | None:
        """``peak_mb``, or ``None`` where the platform gives no memory reading."""
        return None if math.isnan(self.peak_mb) else self.peak_mb
