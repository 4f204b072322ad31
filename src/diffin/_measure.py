"""Wall time and resident memory of a block of work (Linux /proc; falls back to psutil)."""

from __future__ import annotations

import os
import threading
import time


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        import psutil

        return psutil.Process().memory_info().rss / 2**20


class Measure:
    """``with Measure() as m: ...`` → ``m.seconds``, ``m.peak_mb`` (RSS polled every ``every``
    seconds while the block runs) and ``m.rise_mb`` (peak minus the RSS when the block started).

    The polling thread takes the GIL briefly at each poll: Python-heavy work runs a few percent
    slower under it, so time without it (``poll=False``) where seconds matter most.
    """

    def __init__(self, every: float = 0.01, poll: bool = True) -> None:
        self.poll = poll
        self.every = every
        self.start_mb = self.peak_mb = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> Measure:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if self.poll:
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self.poll:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def rise_mb(self) -> float:
        return self.peak_mb - self.start_mb
