"""Benchmark: LaCT Algorithms 3 (context parallel) and 4 (head parallel) against one process.

Per algorithm it reports, per chunk of `chunk_size` tokens:
  * the analytic communication volume: Alg. 3 all-reduces one buffer of the three weight-sized
    updates (+ the momentum-gate sums) per chunk; Alg. 4 makes two all-to-alls of the activations
    per call (q, k, v, lr0..2[, momentum] in, outputs back), amortised over the call's chunks.
    "payload" = bytes each rank hands to the collectives; "wire" = bytes that leave each rank
    (ring all-reduce 2(W−1)/W × payload, all-to-all (W−1)/W × payload);
  * the measured wall time per chunk of the single-process kernel (T_1, one process with the same
    thread count / one device) and of the N-process run (T_N, slowest rank, median over iters);
  * the time spent inside the forward collectives (slowest rank; CUDA synchronised around them);
  * the scaling efficiency T_1 / (N · T_N) (the problem is fixed: strong scaling).
Forward only (no autograd), the one-off metadata all_gather of each call included in T_N.

  python benchmarks/lact_parallel.py --nproc 2 [--json-out out.json]          # CPU, gloo
  torchrun --nproc-per-node 4 benchmarks/lact_parallel.py --backend nccl --device cuda
  python benchmarks/lact_parallel.py --backend nccl --device cuda --nproc 4   # spawns, one GPU each
Under torchrun, RANK / WORLD_SIZE / LOCAL_RANK come from the environment. NCCL_NVLS_ENABLE is
set to 0 before the process group starts (NVLink multicast stays off).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nectar.lact.collectives import CommStats
from nectar.lact.fastweight import swiglu_fast_weight
from nectar.lact.launch import run_group
from nectar.lact.parallel import context_parallel_fast_weight, context_shard_index, head_parallel_fast_weight, head_shard

ALGORITHMS = ("context", "head")
KERNELS = {"context": context_parallel_fast_weight, "head": head_parallel_fast_weight}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark problem and how to run it."""

    heads: int = 8  # batch × heads, folded
    seq_len: int = 2048
    chunk_size: int = 256
    dk: int = 64
    dv: int = 64
    dh: int = 128
    dtype: str = "float32"
    use_muon: bool = True
    momentum: bool = True
    weight_norm: bool = True
    causal: bool = True
    warmup: int = 2
    iters: int = 5
    backend: str = "gloo"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads per process (0: CPU count / N)
    algorithms: tuple[str, ...] = ALGORITHMS

    @property
    def n_chunks(self) -> int:
        return -(-self.seq_len // self.chunk_size)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class BenchRecord:
    """Results of one algorithm on one problem (times in ms per chunk of chunk_size tokens)."""

    algorithm: str
    world_size: int
    backend: str
    device: str
    dtype: str
    heads: int
    seq_len: int
    chunk_size: int
    dk: int
    dv: int
    dh: int
    n_chunks: int
    threads_per_process: int
    comm_payload_bytes_per_chunk: float
    comm_wire_bytes_per_chunk: float
    measured_payload_bytes_per_chunk: float  # from CommStats, to check the analytic payload
    t1_ms_per_chunk: float
    tn_ms_per_chunk: float
    comm_ms_per_chunk: float
    efficiency: float
    max_weight_error: float  # rank 0's final weights vs the single-process run (sanity)


# ----------------------------------------------------------------------------- analytic volume


def comm_bytes_per_chunk(cfg: BenchConfig, algorithm: str, world: int) -> tuple[float, float]:
    """(payload, wire) bytes per chunk per rank, analytic."""
    if algorithm == "context":
        elements = cfg.heads * (2 * cfg.dh * cfg.dk + cfg.dv * cfg.dh + int(cfg.momentum))  # dW0, dW2, dW1, gate
        payload = elements * cfg.itemsize
        return float(payload), 2 * (world - 1) / world * payload
    features_in = 2 * cfg.dk + cfg.dv + 3 + int(cfg.momentum)  # q, k, v, lr0..2, momentum
    per_call = cfg.heads * cfg.seq_len / world * (features_in + cfg.dv) * cfg.itemsize  # in + out
    payload = per_call / cfg.n_chunks
    return payload, (world - 1) / world * payload


# ----------------------------------------------------------------------------- inputs and timing


def full_inputs(cfg: BenchConfig, device: torch.device) -> dict[str, torch.Tensor | None]:
    """The whole problem, identical on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cfg.dtype)
    h, length = cfg.heads, cfg.seq_len

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "q": randn(h, length, cfg.dk, scale=cfg.dk**-0.5),  # [BH, L, dk]
        "k": randn(h, length, cfg.dk, scale=cfg.dk**-0.5),  # [BH, L, dk]
        "v": randn(h, length, cfg.dv),  # [BH, L, dv]
        "w0": randn(h, cfg.dh, cfg.dk, scale=cfg.dk**-0.5),  # [BH, dh, dk]
        "w1": randn(h, cfg.dv, cfg.dh, scale=cfg.dh**-0.5),  # [BH, dv, dh]
        "w2": randn(h, cfg.dh, cfg.dk, scale=cfg.dk**-0.5),  # [BH, dh, dk]
        "lr0": torch.sigmoid(randn(h, length, 1)) * 1e-2,  # [BH, L, 1]
        "lr1": torch.sigmoid(randn(h, length, 1)) * 1e-2,
        "lr2": torch.sigmoid(randn(h, length, 1)) * 1e-2,
        "momentum": torch.sigmoid(randn(h, length, 1)) if cfg.momentum else None,
    }


TOKENS = ("q", "k", "v", "lr0", "lr1", "lr2", "momentum")


def local_inputs(cfg: BenchConfig, data: dict, algorithm: str, rank: int, world: int) -> dict:
    """This rank's part: Alg. 3 its slice of every chunk; Alg. 4 its sequence shard + own heads."""
    if algorithm == "context":
        index = context_shard_index(cfg.seq_len, cfg.chunk_size, rank, world).to(data["q"].device)
        return {n: (x.index_select(1, index) if n in TOKENS else x) if x is not None else None for n, x in data.items()}
    index = torch.arange(cfg.seq_len).tensor_split(world)[rank].to(data["q"].device)  # contiguous shard
    return {n: (x.index_select(1, index) if n in TOKENS else head_shard(x, rank, world)) if x is not None else None
            for n, x in data.items()}


def call(fn, cfg: BenchConfig, t: dict, **extra):
    args = [t[n] for n in ("q", "k", "v", "w0", "w1", "w2", "lr0", "lr1", "lr2")]
    return fn(*args, cfg.chunk_size, use_muon=cfg.use_muon, momentum=t["momentum"],
              weight_norm=cfg.weight_norm, causal=cfg.causal, **extra)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run, cfg: BenchConfig, device: torch.device, barrier: bool) -> list[float]:
    """Wall seconds of `iters` calls after `warmup` calls (ranks aligned by a barrier first)."""
    times = []
    for i in range(cfg.warmup + cfg.iters):
        if barrier:
            dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return times


def slowest(value: float, device: torch.device) -> float:
    """Maximum of a per-rank number over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ----------------------------------------------------------------------------- per-rank work


def single_process(cfg: BenchConfig, data: dict, device: torch.device) -> tuple[float, tuple]:
    """Median seconds per call of the single-process kernel, and its final weights."""
    with torch.no_grad():
        result = call(swiglu_fast_weight, cfg, data)
        times = time_calls(lambda: call(swiglu_fast_weight, cfg, data), cfg, device, barrier=False)
    return statistics.median(times), result[1]


def distributed(cfg: BenchConfig, algorithm: str, local: dict, device: torch.device) -> tuple[float, float, float, tuple]:
    """Median seconds per call and in the collectives (slowest rank each), payload bytes per
    call, and the final weights."""
    stats = CommStats()
    fn = KERNELS[algorithm]
    comm = []

    def run():
        before = stats.seconds
        call(fn, cfg, local, comm_stats=stats)
        comm.append(stats.seconds - before)

    with torch.no_grad():
        weights = call(fn, cfg, local)[1]
        times = time_calls(run, cfg, device, barrier=True)
    comm = comm[cfg.warmup :]
    payload = stats.payload_bytes / (cfg.warmup + cfg.iters)
    return slowest(statistics.median(times), device), slowest(statistics.median(comm), device), payload, weights


def weight_error(algorithm: str, weights, reference, rank: int, world: int) -> float:
    if algorithm == "head":
        reference = [head_shard(w, rank, world) for w in reference]
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(weights, reference))


def bench_worker(rank: int, world: int, cfg: BenchConfig) -> list[dict]:
    """Runs on every rank; rank 0 returns the records."""
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun: this host's ranks
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // processes_here)
    torch.set_num_threads(threads)
    data = full_inputs(cfg, device)
    t1, reference = single_process(cfg, data, device) if rank == 0 else (0.0, None)
    dist.barrier()
    records = []
    for algorithm in cfg.algorithms:
        local = local_inputs(cfg, data, algorithm, rank, world)
        tn, comm, payload, weights = distributed(cfg, algorithm, local, device)
        if rank == 0:
            error = weight_error(algorithm, weights, reference, rank, world)
            records.append(make_record(cfg, algorithm, world, threads, (t1, tn, comm), payload, error))
    return [dataclasses.asdict(r) for r in records]


def make_record(cfg, algorithm, world, threads, seconds, measured_payload, error) -> BenchRecord:
    """seconds: (T_1, T_N, communication) per call."""
    t1, tn, comm = seconds
    payload, wire = comm_bytes_per_chunk(cfg, algorithm, world)
    per_chunk = 1e3 / cfg.n_chunks
    return BenchRecord(
        algorithm=algorithm, world_size=world, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype,
        heads=cfg.heads, seq_len=cfg.seq_len, chunk_size=cfg.chunk_size, dk=cfg.dk, dv=cfg.dv, dh=cfg.dh,
        n_chunks=cfg.n_chunks, threads_per_process=threads,
        comm_payload_bytes_per_chunk=payload, comm_wire_bytes_per_chunk=wire,
        measured_payload_bytes_per_chunk=measured_payload / cfg.n_chunks,
        t1_ms_per_chunk=t1 * per_chunk, tn_ms_per_chunk=tn * per_chunk, comm_ms_per_chunk=comm * per_chunk,
        efficiency=t1 / (world * tn), max_weight_error=error,
    )


# ----------------------------------------------------------------------------- entry points


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def run_torchrun(cfg: BenchConfig) -> list[dict] | None:
    """One rank of a torchrun launch; rank 0 gets the records."""
    if cfg.backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(cfg.backend, timeout=datetime.timedelta(minutes=10))
    try:
        records = bench_worker(dist.get_rank(), dist.get_world_size(), cfg)
    finally:
        dist.destroy_process_group()
    return records if int(os.environ["RANK"]) == 0 else None


def print_table(records: list[dict]) -> None:
    header = f"{'alg':8s} {'N':>2s} {'payload B/chunk':>16s} {'measured':>10s} {'wire B/chunk':>14s} {'T1 ms/chunk':>12s} " \
             f"{'TN ms/chunk':>12s} {'comm ms/chunk':>14s} {'eff':>6s} {'w err':>8s}"
    print(header)
    for r in records:
        print(f"{r['algorithm']:8s} {r['world_size']:2d} {r['comm_payload_bytes_per_chunk']:16,.0f} "
              f"{r['measured_payload_bytes_per_chunk']:10,.0f} "
              f"{r['comm_wire_bytes_per_chunk']:14,.0f} {r['t1_ms_per_chunk']:12.3f} {r['tn_ms_per_chunk']:12.3f} "
              f"{r['comm_ms_per_chunk']:14.3f} {r['efficiency']:6.2f} {r['max_weight_error']:8.1e}")


def parse_args() -> tuple[BenchConfig, int, str | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    p.add_argument("--backend", choices=("gloo", "nccl"), default=defaults.backend)
    p.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    for name in ("heads", "seq_len", "chunk_size", "dk", "dv", "dh", "warmup", "iters", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default=defaults.dtype)
    for name in ("use_muon", "momentum", "weight_norm", "causal"):
        p.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=getattr(defaults, name))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: context,head")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(a).items() if k in fields}
    values["algorithms"] = tuple(x for x in a.algorithms.split(",") if x)
    return BenchConfig(**values), a.nproc, a.json_out


def main() -> None:
    cfg, nproc, json_out = parse_args()
    load_start = os.getloadavg()[0]
    if cfg.backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off (set before any init)
    if launched_by_torchrun():
        records = run_torchrun(cfg)
        if records is None:
            return
    else:
        records = run_group(bench_worker, nproc, cfg, backend=cfg.backend, timeout_s=3600)[0]
    machine = machine_facts(load_start)
    print(json.dumps(dataclasses.asdict(cfg) | machine))
    print_table(records)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "machine": machine, "records": records}, f, indent=2)


def machine_facts(load_start: float) -> dict:
    """What the numbers depend on: versions, cores, the 1-minute load average before and after."""
    facts = {"torch": torch.__version__, "cpu_count": os.cpu_count(),
             "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0]}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


if __name__ == "__main__":
    main()
