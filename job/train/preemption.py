"""SIGTERM handling: a preempted job exits with EXIT_PREEMPTED (75) and loses nothing already checkpointed."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from job.errors import PreemptedError


class PreemptionFlag:
    """Records SIGTERM instead of dying, so the trainer can save a checkpoint at the end of the step first."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            print("SIGTERM received: saving a checkpoint after this step, then stopping", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> PreemptionFlag:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


_pending: list[PreemptedError] = []
"""The stop a SIGTERM requested inside `stop_on_sigterm`, until the block ends."""


@contextmanager
def stop_on_sigterm(message: str = "stopped by SIGTERM outside training; completed checkpoints are kept; "
                                   "rerun with --resume auto to continue") -> Iterator[None]:
    """Outside the training loop, SIGTERM stops the job at once with PreemptedError (exit 75).

    An exception raised inside a Python callback that C code runs (SQLite's progress handler, authorizer and
    functions) only aborts that call, so the request is also kept for `raise_if_stopped`."""

    def handle(signum: int, frame: Any) -> None:
        _pending[:] = [PreemptedError(message)]
        raise _pending[0]

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _pending.clear()


def raise_if_stopped() -> None:
    """Raise the pending SIGTERM stop, if any (for code after a C call whose callbacks may have swallowed it)."""
    if _pending:
        raise _pending[0]
