"""Several processes training together (torchrun, `python -m job.platforms.launch`, accelerate launch): who they are and
how they agree.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) says who a process is. Rank 0 is the one writer of
the run folder and the bucket (`on_main`); a node's local rank 0 fills caches on that node first
(`local_main_first`). Every helper is a no-op in a single process, so callers need no branches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from job.errors import JobError

T = TypeVar("T")


class RankFailedError(JobError):
    """Another rank failed in a step that every rank takes part in; this one stops with it."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes the run folder, logs, mirrors checkpoints and publishes."""
    return rank() == 0


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Several processes, joined in a process group (see `init`)."""
    return world_size() > 1 and _joined()


def init(timeout_s: float) -> None:
    """Join the process group (nccl on GPUs, gloo on CPU) when launched as several processes. `timeout_s`
    bounds every collective: a rank that dies or hangs fails the others after at most that long."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def close() -> None:
    """Leave the process group (quietly; the run's result does not depend on it)."""
    if world_size() > 1 and _joined():
        import torch.distributed as dist

        dist.destroy_process_group()


@contextmanager
def session(timeout_s: float) -> Iterator[None]:
    """Joined for the block. A collective that fails because another rank died (or timed out) becomes one
    line instead of a traceback: the rank that failed first has the real story in its own log."""
    init(timeout_s)
    try:
        yield
    except RuntimeError as exc:
        if not (active() and _lost_peer(exc)):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        message = f"another process of the run failed or stopped, so this one stops too ({first})"
        raise RankFailedError(message) from None
    finally:
        close()


def _lost_peer(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")
    )


def barrier() -> None:
    if _joined():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def local_main_first() -> Iterator[None]:
    """The block runs on each node's local rank 0 first (filling a cache), then on the other ranks (reading it)."""
    first = local_rank() == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def _device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (an all-reduce, so every rank must call it)."""
    if not _joined():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_all(values: list[int]) -> list[int]:
    """Element-wise sum of `values` over all ranks (every rank must call it)."""
    if not _joined():
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.long, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def gather_all(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _joined():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _joined():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `func` on rank 0 only and hand its result to every rank; the others wait for it. A JobError raised on
    rank 0 is raised on every rank (same message and exit code), so all stop together instead of hanging."""
    if not _joined():
        return func(*args, **kwargs)
    outcome: tuple[Any, BaseException | None] = (None, None)
    if is_main():
        try:
            outcome = (func(*args, **kwargs), None)
        except JobError as exc:
            outcome = (None, exc)
        except BaseException as exc:
            broadcast((None, RankFailedError(f"rank 0 failed: {type(exc).__name__}: {exc}")))
            raise
    result, error = broadcast(outcome)
    if error is not None:
        raise error
    return result


def say(message: str) -> None:
    """A line on stderr from rank 0 only, so N processes still make one log stream."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def describe_batch(per_device: int, accumulation: int) -> str:
    """`global batch 8 = 2 per device x 2 accumulation x 2 processes`."""
    n = world_size()
    processes = f"{n} process{'es' if n > 1 else ''}"
    return (f"global batch {per_device * accumulation * n} = {per_device} per device x {accumulation} accumulation"
            f" x {processes}")


WORLD_SIZE_STATE = "ProcessCount"
"""Key in a checkpoint's trainer_state.json (`stateful_callbacks`) under which rank 0 records how many processes
wrote it (job.train.trainer.ProcessCount, transformers' ExportableState): saved in the one file that marks the
checkpoint complete, so a checkpoint that counts as complete always says who wrote it."""


def on_main_node() -> bool:
    """Whether this process runs on rank 0's node (and so writes to rank 0's disk): torchrun numbers the ranks
    node by node, so only there is a process's global rank its local rank."""
    return rank() == local_rank()


def checkpoint_world_size(checkpoint: str) -> int:
    """How many processes wrote a Trainer checkpoint: the count rank 0 recorded in its trainer_state.json, else
    (checkpoints saved before it was recorded) one `rng_state_<rank>.pth` per process found in the folder (one
    `rng_state.pth` for a single process). 0 when neither says (saved with save_only_model)."""
    import json
    from pathlib import Path

    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        recorded = state["stateful_callbacks"][WORLD_SIZE_STATE]["args"]["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    names = {p.name for p in Path(checkpoint).glob("rng_state*.pth")}
    if "rng_state.pth" in names:
        return 1
    return len(names)


def check_resume_world_size(checkpoint: str | None) -> None:
    """Refuse (exit 2) to continue a checkpoint written by a different number of processes: the global batch,
    and with it the data order and the meaning of a step, would change mid-run."""
    if checkpoint is None:
        return
    written_by, now = checkpoint_world_size(checkpoint), world_size()
    if written_by and written_by != now:
        from job.errors import ConfigError

        raise ConfigError(
            f"{checkpoint} was written by {written_by} process(es), this run has {now}: resuming would change the "
            f"global batch ({written_by}x -> {now}x per-device batch x accumulation) mid-run; resume with "
            f"{written_by} process(es), or pass --overwrite to start over"
        )


def ensure_checkpoint_here(checkpoint: str | None, checkpoint_uri: str | None) -> None:
    """Several nodes without a shared disk: rank 0 fetched the checkpoint into its own run folder; each other
    node's local rank 0 fetches the same one from the mirror when its disk lacks a complete copy (its own ranks'
    earlier saves left only their RNG states there), then that node's ranks read it. Nothing to do on one node,
    or when the folder is shared."""
    with local_main_first():
        from job.train.checkpoints import fetch_checkpoint, is_complete

        if checkpoint is None or checkpoint_uri is None or is_complete(checkpoint):
            return
        from pathlib import Path

        from job.storage.objects import join

        target = Path(checkpoint)
        fetch_checkpoint(join(checkpoint_uri, target.name), target.parent)
