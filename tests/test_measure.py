"""diffin's one memory meter (``diffin._measure.Measure``): wall time and RSS peaks without psutil."""

from __future__ import annotations

import math
import mmap
import sys
import time

import numpy as np
import pytest

from diffin import _measure
from diffin._errors import ConfigError
from diffin._measure import Measure, rss_mb

MB = 2**20


def test_rss_is_positive_and_finite() -> None:
    mb = rss_mb()
    assert math.isfinite(mb) and mb > 1.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the current RSS is read from /proc")
def test_peak_sees_a_buffer_allocated_and_freed_inside_the_block() -> None:
    """A 128 MiB buffer touched and freed inside the block: the peak rises by about its size, the
    RSS after the block does not. The buffer is a fresh anonymous mapping, not ``np.ones``: malloc
    serves a large request from free heap memory that earlier work left resident (after other
    tests, 128 MiB that way raised the RSS by one page), and the meter is right not to count it.
    The buffer is held until the polling thread has read the RSS twice more (a busy machine may not
    schedule it within any fixed sleep), so the test checks the meter, not the allocator or the
    scheduler."""
    with Measure(every=0.005) as m:
        buf = mmap.mmap(-1, 128 * MB)  # new pages, resident once written
        np.frombuffer(buf, dtype=np.uint8)[:] = 1  # every page written
        seen, deadline = m.polls, time.monotonic() + 60.0
        while m.polls < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        buf.close()  # unmapped: the pages leave the RSS
    assert m.polls >= seen + 2, "the polling thread did not run for 60 s"
    assert 100 <= m.rise_mb <= 400
    assert m.peak_mb >= m.start_mb + m.rise_mb - 1e-9
    assert rss_mb() < m.peak_mb - 64


def test_without_polling_the_end_reading_still_counts() -> None:
    with Measure(poll=False) as m:
        buf = np.ones(64 * MB // 8)
        inside = rss_mb()  # what the block ends with (the allocator may reuse resident pages)
    assert m._thread is None and m.peak_mb >= m.start_mb
    if sys.platform.startswith("linux"):
        assert m.peak_mb >= inside - 1.0  # the end reading counts without any poll
    del buf


def test_readings_survive_an_exception_in_the_block() -> None:
    m = Measure(every=0.005)
    with pytest.raises(KeyError), m:
        time.sleep(0.02)
        raise KeyError("boom")
    assert m.seconds >= 0.02 and m.peak_mb > 0 and m._thread is None


def test_getrusage_fallback_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc the high-water mark from getrusage is used: positive, never below what
    /proc reported a moment before (the current RSS is at most the high-water mark)."""
    now = rss_mb()
    monkeypatch.setattr(_measure, "_proc_rss_mb", lambda: None)
    hw = rss_mb()
    assert math.isfinite(hw) and hw >= 0.9 * now
    with Measure(every=0.005) as m:
        pass
    assert m.peak_mb_or_none is not None and m.rise_mb >= 0


def test_no_memory_reading_gives_nan_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_measure, "_proc_rss_mb", lambda: None)
    monkeypatch.setattr(_measure, "_rusage_peak_mb", lambda: None)
    with Measure() as m:
        time.sleep(0.01)
    assert math.isnan(m.peak_mb) and m.peak_mb_or_none is None and m._thread is None
    assert m.seconds >= 0.01


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="interval"):
        Measure(every=0)
