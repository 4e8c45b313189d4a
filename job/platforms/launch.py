"""`python -m job.platforms.launch TORCHRUN_ARGS...`: torchrun, keeping the job's exit codes.

torchrun reports any failed worker as its own exit code 1, so an orchestrator cannot tell a bad config (2) or
missing input (3), which no retry can fix, from a preemption after a checkpoint (75), which a retry resumes.
This runs torchrun's own `run` (same options, same rendezvous) and exits with what the run means: 0 when every
rank succeeded; 2 or 3 when a rank could not start; 75 when the ranks stopped on SIGTERM after saving a
checkpoint; else 1, with one line naming the rank that failed first. When one rank fails, torchrun stops the
others at once, so a crashed rank never leaves the run hanging. Arguments are exactly torchrun's.

SIGTERM to the launcher (the kubelet, `docker stop`, SageMaker): torchrun passes it to its processes and kills
them `--shutdown-timeout` seconds later (torchrun's default is 30 s, too short to finish a step and save a
checkpoint; here it is SHUTDOWN_TIMEOUT_S unless `--shutdown-timeout` or TORCH_ELASTIC_SHUTDOWN_TIMEOUT says
otherwise; keep it below the platform's grace period). Each process that stopped with nothing lost leaves a stop
report (job.train.preemption), and the launcher exits 75 only when every one of its processes did; otherwise
it exits 1 and names the processes that were killed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from job.errors import EXIT_PREEMPTED, EXIT_UNEXPECTED
from job.train.preemption import STOP_REPORTS_ENV, stop_report_path

KEPT_EXIT_CODES = frozenset({2, 3, 75})
"""Worker exit codes that survive the launcher: usage/config, missing input or credentials, preempted."""
SHUTDOWN_TIMEOUT_S = 150
"""Seconds torchrun waits, after passing SIGTERM on, for the processes' checkpoint before it kills them: a step,
the save and the upload of a large adapter's checkpoint. Platforms give 180 s of grace (the manifests) and
pass a shorter value where they give less (SageMaker: 120 s, so 100)."""


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


def stopped_by_signal(reports: Path, local_world_size: int, timeout_s: int) -> tuple[int, str]:
    """After torchrun stopped this node's processes on SIGTERM: the exit code and the line that says it. 75 when
    every local process left a stop report (it stopped with nothing lost: its checkpoint was saved, or it was
    outside training), else 1, naming the processes that did not."""
    records: dict[int, dict] = {}
    for local_rank in range(local_world_size):
        try:
            records[local_rank] = json.loads(stop_report_path(reports, local_rank).read_text())
        except (OSError, ValueError):
            continue
    missing = [local_rank for local_rank in range(local_world_size) if local_rank not in records]
    if not missing:
        first = records[0].get("message", "") if records else ""
        return EXIT_PREEMPTED, (f"launch: stopped by SIGTERM; every process stopped safely ({first}) "
                                f"-> exit {EXIT_PREEMPTED}")
    names = ", ".join(str(local_rank) for local_rank in missing)
    return EXIT_UNEXPECTED, (
        f"error: stopped by SIGTERM, but local rank(s) {names} of {local_world_size} did not save a checkpoint "
        f"before torchrun stopped them (killed after its {timeout_s} s shutdown timeout, or failed while saving: "
        f"see their log); the work since the last checkpoint is lost -> exit {EXIT_UNEXPECTED}"
    )


def _shutdown_timeout(args: argparse.Namespace) -> int:
    """torchrun's shutdown timeout for this launch: `--shutdown-timeout`, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    else SHUTDOWN_TIMEOUT_S (set on `args`, which torchrun reads)."""
    if args.shutdown_timeout is None:
        env = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "").strip()
        args.shutdown_timeout = int(env) if env else SHUTDOWN_TIMEOUT_S
    return args.shutdown_timeout


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    timeout_s = _shutdown_timeout(args)
    reports = Path(tempfile.mkdtemp(prefix="finetune-stop-reports-"))
    os.environ[STOP_REPORTS_ENV] = str(reports)  # the processes inherit the launcher's environment
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
    except SignalException:
        code, line = stopped_by_signal(reports, determine_local_world_size(args.nproc_per_node), timeout_s)
        print(line, file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
