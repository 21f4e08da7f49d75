"""LoRAX's `--max-concurrent-requests`: a non-blocking limit on requests in flight; over it, 429 at once."""

from __future__ import annotations

from collections.abc import Callable

from loraserve.errors import Overloaded


class ConcurrencyLimit:
    """Counts requests from admission until their response is complete (the whole stream, for streams).

    Only the event loop thread touches it, so a plain counter is enough.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> Callable[[], None]:
        """Take a slot or raise `Overloaded`; returns the function that gives the slot back (idempotent)."""
        if self.in_flight >= self.limit:
            raise Overloaded("Model is overloaded")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release
