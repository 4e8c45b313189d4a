"""`python -m job.platforms.launch TORCHRUN_ARGS...`: torchrun, keeping the job's exit codes.

torchrun reports any failed worker as its own exit code 1, so an orchestrator cannot tell a bad config (2) or
missing input (3), which no retry can fix, from a preemption after a checkpoint (75), which a retry resumes.
This runs torchrun's own `run` and exits with the failed workers' code when it is one of those (the first
failure's code if several ranks failed alike), else 1. Arguments are exactly torchrun's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from job.errors import EXIT_UNEXPECTED

KEPT_EXIT_CODES = frozenset({2, 3, 75})
"""Worker exit codes that survive the launcher: usage/config, missing input or credentials, preempted."""


def exit_code(worker_codes: Sequence[int]) -> int:
    """The launcher's exit code for the failed workers' codes (in rank order).

    A code every failed worker agrees on among 2/3/75 is kept; 2 and 3 win over 75 (a retry cannot help when
    one rank cannot start); anything else (a crash, a signal) is 1.
    """
    codes = [code for code in worker_codes if code != 0]
    if not codes:
        return 0
    for code in (2, 3):
        if code in codes:
            return code
    return 75 if all(code == 75 for code in codes) else EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [exc.failures[rank].exitcode for rank in sorted(exc.failures)]
        code = exit_code(codes)
        print(f"launch: worker exit codes {codes} -> exit {code}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
