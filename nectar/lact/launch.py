"""Run a function on N local processes joined in one torch.distributed group (tests, benchmarks).

`run_group(fn, world_size, *args)` starts `world_size` processes, initialises a process group in
each (rendezvous through a FileStore in a temporary directory, so no port is needed), calls
`fn(rank, world_size, *args)` and returns the per-rank return values (pickled through files).

Failures never hang the caller:
  * a child that raises makes the parent raise `ChildFailed` naming the rank that failed first and
    carrying its traceback (the other ranks usually fail next, in a collective the first one left,
    and are listed after it); the children still running are terminated;
  * a group still running after `timeout_s` (e.g. a rank waiting in a collective that another
    rank never joins) is terminated, its processes only (SIGTERM, then SIGKILL), and the parent
    raises TimeoutError. The children's collectives time out after `timeout_s` too.

Under torchrun use torch.distributed directly instead; this is for single-host runs that start
their own processes (CPU gloo in CI, or one process per GPU with NCCL).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

KILL_GRACE_S = 5.0  # after SIGTERM, how long a child may take to exit before SIGKILL


class ChildFailed(RuntimeError):
    """A rank of a `run_group` group raised; `rank` is the one that failed first."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def _entry(rank: int, world_size: int, fn, args, backend: str, init_file: str, result_dir: str,
           threads: int, timeout_s: float) -> None:
    """Child process: join the group, run fn, write its result, leave the group."""
    torch.set_num_threads(threads)
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        with open(Path(result_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        # written before the group is torn down, so the first failure is on disk before the
        # failures it causes on the other ranks
        (Path(result_dir) / f"rank{rank}.err").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_group(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    start_method: str = "spawn",
    threads: int | None = None,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on world_size processes; return the results by rank.

    fn must be picklable by reference (a module-level function) under the "spawn" start method;
    "fork" starts faster (no re-import of torch) where the platform has it. threads: torch
    intra-op threads per process (default: the CPU count shared out, at least 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="lact_group_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        child_args = (world_size, fn, args, backend, init_file, tmp, threads, timeout_s)
        context = mp.start_processes(_entry, args=child_args, nprocs=world_size, join=False, start_method=start_method)
        try:
            _join(context, timeout_s)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            failure = _first_failure(Path(tmp))
            if failure is None:  # died without a Python exception (a signal): mp's message says how
                raise
            raise failure from e
        except BaseException:  # interrupted (Ctrl-C, a test timeout): leave no child behind
            _stop(context.processes)
            raise
        return [pickle.loads((Path(tmp) / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]


def _join(context: mp.ProcessContext, timeout_s: float) -> None:
    """Wait for all children (a child's exception is re-raised by context.join); on timeout
    terminate exactly those processes and raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            _stop(context.processes)
            raise TimeoutError(f"process group did not finish within {timeout_s} s "
                               f"(ranks {alive} still running; terminated)")


def _first_failure(result_dir: Path) -> ChildFailed | None:
    """The ranks' written tracebacks, earliest first, as one error (None if none was written)."""
    reports = []
    for path in result_dir.glob("rank*.err"):
        stamp, _, text = path.read_text().partition("\n")
        reports.append((float(stamp), int(path.stem.removeprefix("rank")), text.rstrip()))
    if not reports:
        return None
    reports.sort()
    _, rank, text = reports[0]
    last_line = text.splitlines()[-1] if text else "unknown error"
    message = f"rank {rank} failed first: {last_line}\n{text}"
    for _, other, other_text in reports[1:]:
        message += f"\n-- then rank {other}: {other_text.splitlines()[-1] if other_text else ''}"
    return ChildFailed(rank, message)


def _stop(processes) -> None:
    """SIGTERM every live child, then SIGKILL those still alive after KILL_GRACE_S."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + KILL_GRACE_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
