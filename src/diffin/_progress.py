"""Progress bars: one place that decides how they look and when they show."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar that shows only when ``enabled`` and standard error is a terminal.

    Redirected to a log file or a pipe (CI, ``nohup``, ``> log``) it prints nothing, so logs do
    not fill with carriage-return updates (tqdm's ``disable=None``)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, **kw)
