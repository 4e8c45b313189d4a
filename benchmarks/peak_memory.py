"""Peak memory of the current process, for the benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path


def own_peak_rss_kb() -> int:
    """This process's peak RSS since its exec (VmHWM). Not getrusage(RUSAGE_SELF): Linux carries the parent's
    peak across fork and exec, so a case started by a big `make bench` process would report that process's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
