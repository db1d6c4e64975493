"""Root error of the streams layer; every error here carries the data needed to act on it."""

from __future__ import annotations


class StreamsError(Exception):
    """Root of every error raised by ``streams``."""


class InvalidEvent(StreamsError):
    """A message that cannot become an event. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StoreUnavailable(StreamsError):
    """Redis (or another store) could not be reached; callers degrade instead of failing requests."""
