"""Data-parallel replicas from the command line: `torchrun --nproc-per-node N -m nectar run|frontier|hw-run …`.

torchrun starts N processes with RANK, WORLD_SIZE and LOCAL_RANK in their environment; `launch()`
reads them (None when the command was not started by torchrun: everything then runs as one
process, unchanged). `replica_group(torch_device, launch)` joins the process group — gloo when the
model runs on the CPU (the simulator), NCCL with one GPU per process (`torch.cuda.set_device(LOCAL_RANK)`,
NVLink multicast off) when it runs on CUDA — and makes it the active replica group, so that
`run_experiment` runs data-parallel (`nectar.control.replicas`).

Which GPU a replica measures: NVML numbers GPUs in PCI bus order, so `launch()` sets
CUDA_DEVICE_ORDER=PCI_BUS_ID before CUDA starts (and refuses another order), and `nvml_index`
maps the replica's CUDA device through CUDA_VISIBLE_DEVICES (integer indices only) to NVML's index.
Each replica's backend gets its own seed (seed + rank: the simulated GPUs are distinct units) and,
on CUDA, its NVML device index. Rank 0 writes the outputs and prints; the others write nothing.
This module imports torch only inside its functions (`--help` must stay light).
"""

from __future__ import annotations

import argparse
import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT = datetime.timedelta(minutes=30)   # a collective waits this long for a slow replica


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run's outputs and prints; the other replicas write nothing."""
        return self.rank == 0


def launch() -> Launch | None:
    """The torchrun launch this process belongs to (None: not started by torchrun)."""
    if not all(name in os.environ for name in TORCHRUN_VARS):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in TORCHRUN_VARS)
    except ValueError:
        raise ValueError(f"torchrun's {', '.join(TORCHRUN_VARS)} must be integers, got "
                         f"{[os.environ[n] for n in TORCHRUN_VARS]}") from None
    if not (0 <= rank < world and 0 <= local):
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    order = os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if order != "PCI_BUS_ID":
        raise ValueError(f"CUDA_DEVICE_ORDER={order}: data-parallel replicas need PCI_BUS_ID (NVML's order), so that "
                         "each replica's NVML window measures the GPU its model runs on")
    return Launch(rank, world, local)


def nvml_index(local_rank: int) -> int:
    """NVML's index of CUDA device `local_rank` (CUDA in PCI bus order, CUDA_VISIBLE_DEVICES applied)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return local_rank
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not all(e.isdigit() for e in entries):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: list GPUs by integer index (NVML's, PCI bus order) "
                         "so that each replica's NVML window can be matched to its CUDA device")
    if local_rank >= len(entries):
        raise ValueError(f"LOCAL_RANK {local_rank} but CUDA_VISIBLE_DEVICES lists {len(entries)} GPU(s)")
    return int(entries[local_rank])


def backend_args(args: argparse.Namespace, where: Launch) -> argparse.Namespace:
    """The arguments a replica's backend is made from: the experiment's, with seed + rank."""
    return argparse.Namespace(**{**vars(args), "seed": args.seed + where.rank})


def device_options(torch_device: str, where: Launch) -> dict:
    """Backend options that pick the replica's GPU: NVML's index of its CUDA device (none on the CPU)."""
    return {"device_index": nvml_index(where.local_rank)} if torch_device.startswith("cuda") else {}


@contextmanager
def replica_group(torch_device: str, where: Launch | None) -> Iterator:
    """Within the block, the process group of the torchrun launch is the active replica group
    (yields the `ReplicaGroup`, or None without a launch)."""
    if where is None:
        yield None
        return
    import torch
    import torch.distributed as dist

    from nectar.control.replicas import ReplicaGroup, data_parallel

    if torch_device.startswith("cuda"):
        if not torch.cuda.is_available() or where.local_rank >= torch.cuda.device_count():
            raise ValueError(f"replica {where.rank} needs CUDA device {where.local_rank}; torch sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} (one GPU per process)")
        os.environ["NCCL_NVLS_ENABLE"] = "0"           # NVLink multicast stays off
        torch.cuda.set_device(where.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)   # env:// from torchrun's variables
    try:
        with data_parallel(ReplicaGroup()) as group:
            yield group
    finally:
        dist.destroy_process_group()
