"""`python -m job.platforms.launch TORCHRUN_ARGS...`: torchrun, keeping the job's exit codes.

torchrun reports any failed worker as its own exit code 1, so an orchestrator cannot tell a bad config (2) or
missing input (3), which no retry can fix, from a preemption after a checkpoint (75), which a retry resumes.
This runs torchrun's own `run` (same options, same rendezvous) and exits with what the run means: 0 when every
rank succeeded; 2 or 3 when a rank could not start; 75 when the ranks stopped on SIGTERM after saving a checkpoint
(also when the launcher itself received SIGTERM and passed it on); else 1, with one line naming the rank that
failed first. When one rank fails, torchrun stops the others at once, so a crashed rank never leaves the run
hanging. Arguments are exactly torchrun's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from job.errors import EXIT_PREEMPTED, EXIT_UNEXPECTED

KEPT_EXIT_CODES = frozenset({2, 3, 75})
"""Worker exit codes that survive the launcher: usage/config, missing input or credentials, preempted."""


def exit_code(worker_codes: Sequence[int]) -> int:
    """The launcher's exit code for the failed workers' codes (in rank order).

    Negative codes are ranks torchrun stopped by a signal once another rank had failed, so the codes of ranks
    that exited by themselves decide: 2 and 3 win (a retry cannot help when one rank cannot start); 75 when
    every such rank stopped after the SIGTERM checkpoint; anything else (a crash, only signals) is 1.
    """
    if not any(code != 0 for code in worker_codes):
        return 0
    exited = [code for code in worker_codes if code > 0]
    for code in (2, 3):
        if code in exited:
            return code
    return EXIT_PREEMPTED if exited and all(code == EXIT_PREEMPTED for code in exited) else EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [exc.failures[rank].exitcode for rank in sorted(exc.failures)]
        code = exit_code(codes)
        if code == EXIT_PREEMPTED:
            print(f"launch: every rank stopped after saving a checkpoint -> exit {code}", file=sys.stderr, flush=True)
        else:
            first_rank, first = exc.get_first_failure()
            how = (f"was killed by signal {first.signal_name()}" if first.exitcode < 0
                   else f"exited with code {first.exitcode}")
            others = [f"rank {r}: {f.exitcode}" for r, f in sorted(exc.failures.items()) if r != first_rank]
            print(f"error: rank {first_rank} {how} first; every rank was stopped "
                  f"(other ranks: {', '.join(others) or 'none failed'}) -> exit {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        print(f"stopped by {exc.sigval.name}: the ranks were asked to save a checkpoint and stop; "
              "rerun with --resume auto to continue", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
