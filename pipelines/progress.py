"""The progress callback every long operation takes: called with a fraction done (0..1) and a message, sometimes
with named fields after them (an ingest's document counts, a download's bytes); `no_progress` is the default."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[..., None]  # (fraction 0..1, message, **fields)


def no_progress(*_args, **_fields) -> None:
    """The progress callback of a caller that does not watch."""
