"""`python -m job.launch [torchrun options] -m job train|run ...`: torchrun, with the job's exit codes.

torchrun itself exits 1 whatever its workers did. This launcher runs the same torchrun (same options, same
rendezvous) and exits with what the run means: 0 when every rank succeeded; 75 when the ranks stopped on
SIGTERM after saving a checkpoint (also when torchrun itself received SIGTERM and passed it on); otherwise the
exit code of the rank that failed first (1 when it was killed by a signal), with one line naming that rank.
When one rank fails, torchrun stops the others at once, so a crashed rank never leaves the run hanging.
"""

from __future__ import annotations

import sys

from job.errors import EXIT_PREEMPTED, EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code != EXIT_PREEMPTED:
            how = f"was killed by signal {failure.signal_name()}" if code < 0 else f"exited with code {code}"
            print(f"error: rank {failed_rank} {how} first; every rank was stopped "
                  f"(other ranks: {_others(exc, failed_rank)})", file=sys.stderr, flush=True)
        sys.exit(code if code > 0 else EXIT_UNEXPECTED)
    except SignalException as exc:
        print(f"stopped by {exc.sigval.name}: the ranks were asked to save a checkpoint and stop; "
              "rerun with --resume auto to continue", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    sys.exit(0)


def _others(exc: object, first: int) -> str:
    failures = getattr(exc, "failures", {})
    others = [f"rank {rank}: {f.exitcode}" for rank, f in sorted(failures.items()) if rank != first]
    return ", ".join(others) or "none failed"


if __name__ == "__main__":
    main()
