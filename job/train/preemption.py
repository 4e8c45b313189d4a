"""SIGTERM handling: a preempted job exits with EXIT_PREEMPTED (75) and loses nothing already checkpointed.

Under `python -m job.platforms.launch` each process also leaves a stop report for the launcher (a file in
`$FINETUNE_STOP_REPORTS`, named by its local rank) when it stops this way, so the launcher exits 75 only when
every one of its processes did, and says which did not when torchrun had to kill them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from job.errors import PreemptedError

STOP_REPORTS_ENV = "FINETUNE_STOP_REPORTS"
"""Folder the launcher creates and passes to its processes; each writes `local-rank-<N>.json` there."""


def stop_report_path(folder: Path, local_rank: int) -> Path:
    return folder / f"local-rank-{local_rank}.json"


def _own_report() -> Path | None:
    folder = os.environ.get(STOP_REPORTS_ENV)
    return stop_report_path(Path(folder), int(os.environ.get("LOCAL_RANK", "0"))) if folder else None


def report_stop(message: str) -> None:
    """Tell the launcher (if any) that this process stopped on SIGTERM with nothing lost, and why."""
    path = _own_report()
    if path is None:
        return
    record = {"rank": int(os.environ.get("RANK", "0")), "message": message}
    with contextlib.suppress(OSError):  # the launcher then reports this process as not stopped safely
        path.write_text(json.dumps(record))


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
    """Outside the training loop, SIGTERM stops the job at once with PreemptedError (exit 75). Any
    PreemptedError leaving the block (this one, or training's after its checkpoint) is reported to the
    launcher; a report left by an earlier attempt of this process's slot is removed first.

    An exception raised inside a Python callback that C code runs (SQLite's progress handler, authorizer and
    functions) only aborts that call, so the request is also kept for `raise_if_stopped`."""

    def handle(signum: int, frame: Any) -> None:
        _pending[:] = [PreemptedError(message)]
        raise _pending[0]

    stale = _own_report()
    if stale is not None:
        stale.unlink(missing_ok=True)
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except PreemptedError as exc:
        report_stop(str(exc))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _pending.clear()


def raise_if_stopped() -> None:
    """Raise the pending SIGTERM stop, if any (for code after a C call whose callbacks may have swallowed it)."""
    if _pending:
        raise _pending[0]
