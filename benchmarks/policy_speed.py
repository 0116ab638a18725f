"""Benchmark: every routing policy's forward on the same chunk — tokens/s, J/token, host syncs, kernels.

The model is the GPU experiment's MoE-DistilGPT2 shape with random weights (6 layers × 768, the
`distilgpt2` recipe's pool: 6 full GELU experts 768→3072, one narrow, one zero, one copy; bf16 on
CUDA). Each policy's routers are installed in turn on the same model and the same chunk (rows ×
seq-len tokens, run in micro-batches), policies interleaved round by round (the order rotates,
so drift and heat hit every policy alike); per policy and round one timed chunk, and on CUDA its
energy from NVML's total-energy counter (read-only; the counter moves every ~100 ms, so a chunk
should last ≥ 0.5 s). Reported per policy (medians over rounds; speed and energy also as the
median of the per-round ratios to static-top2 of the same round):

  tokens_per_s, speed_vs_top2, J_per_token, energy_vs_top2,
  syncs_per_chunk      CUDA syncs of one micro-batch's forward (set_sync_debug_mode) × micro-batches
  host_reads_per_forward  tensor values read to the host in one forward (any device: the CPU test's count)
  kernels_per_forward  CUDA kernels one micro-batch forward launches (torch.profiler), None off CUDA
  kernel_gpu_us_per_forward  their summed device time (µs; kernels may overlap, so not wall time)
  forward_wall_us      the wall time of one micro-batch forward in the timed rounds (median chunk / micro-
                       batches): well above the kernels' time, the forward is host-bound
  kernels_vs_top2      the kernels whose launches or device time differ most from static-top2's
                       (policy minus top-2): where an identical-routing gap is spent
  top_kernels          the kernels with the most device time in one forward (to set one dispatch's
                       run against another's)
  allocator_in_rounds  the CUDA caching allocator's cudaMalloc / cudaFree calls and cache-flushing retries
                       (each a device-wide sync) over the policy's timed chunks ({} off CUDA)
  host_us_per_forward  the torch ops' summed self host time in the profiled forward (µs; the profiler
                       inflates it, so compare policies, not wall times)
  host_ops_vs_top2     the host ops whose calls or self host time differ most from static-top2's
  slots_per_token      (token, expert) pairs computed per token, mean over layers (first micro-batch)
  chunk_forward        whether the timed forward was the experiment's (`--chunk-forward`) or the bare model's
  graphs               whether the policy's timed forwards were CUDA-graph replays (`--graphs`, grouped
                       dispatch; False where the capture failed: then timed eagerly)
  telemetry            how a timed chunk was read: `counter` (NVML's energy counter at its edges) or
                       `backend` (inside the telemetry backend's window, sampler thread on, as hw-run)
  fused_router         whether the routers ran as one kernel (nectar.moe.fused_router; on CUDA with
                       Triton unless NECTAR_FUSED_ROUTER=0) or on their torch paths
  (policy `drop-all`: NECTAR's router dropping every second slot, i.e. static top-1's routing through
   the drop path; compare it with static-top1)
  same_routing_as_top2 whether the policy's decisions select exactly static top-2's (token, expert)
                       pairs on the chunk's first micro-batch (the identical-routing pairs:
                       static-top2, fixed-bias:0, fixed-price:1e9)
  predicted_speed_vs_top2  what the cost table measured before the rounds (nectar.experiment.calibration,
                       in the same dispatch; NVML on CUDA, the simulator's pricing on the CPU smoke run)
                       predicts: top-2's predicted time over the policy's, for the routing the policy
                       chose on the chunk's first micro-batch
The cost table itself is written beside the JSON (`<json-out stem>.cost_table.json`).

    PYTHONPATH=. python benchmarks/policy_speed.py --device cuda --json-out policy_speed.json
    PYTHONPATH=. python benchmarks/policy_speed.py --device cpu --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forward_chunk import DTYPES, build_model, count_host_syncs  # noqa: E402
from benchmarks.timing import check_device_and_sizes, environment, synchronize, write_json  # noqa: E402
from nectar.control.cost_table import CostTable  # noqa: E402
from nectar.experiment.calibration import CalibrationConfig, calibrate  # noqa: E402
from nectar.experiment.forward import forward_chunk, install  # noqa: E402
from nectar.experiment.host_reads import count_host_reads  # noqa: E402
from nectar.experiment.policies import policy_router  # noqa: E402
from nectar.moe import fused_router  # noqa: E402
from nectar.telemetry.energy import window_energy_J  # noqa: E402

DROP_ALL = "drop-all"
POLICIES = ("static-top2", "fixed-bias:0", "fixed-price:1e9", "static-top1", "static-cheap", "top-p:0.5",
            "fixed-price:0.5", "fixed-price:1", "fixed-price:2", "nectar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--rows", type=int, default=1024, help="sequences per chunk")
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per forward")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dispatch", choices=["grouped", "compiled", "loop"], default="loop",
                        help="the MoE layers' dispatch (loop: what the experiments use today; compiled: "
                             "grouped with gate → router → dispatch under torch.compile)")
    parser.add_argument("--compile-router", action="store_true",
                        help="gate → router under torch.compile, the dispatch as --dispatch says (MoELayer.compile_router)")
    parser.add_argument("--graphs", action="store_true",
                        help="time each policy's micro-batch forward as a captured CUDA graph (needs CUDA and "
                             "--dispatch grouped, the sync-free path; not with --chunk-forward, whose recorder "
                             "keeps host-side state); kernels, syncs and reads are still those of the eager forward")
    parser.add_argument("--model", default=None,
                        help="a saved experiment model folder (`nectar hw-run --save-model DIR`) instead of random "
                             "weights; the chunk is its held-out stream")
    parser.add_argument("--chunk-forward", action="store_true",
                        help="time the experiment's chunk forward (nectar.experiment.forward.forward_chunk: the "
                             "routing recorder, sampled logits and inputs, per-row NLL, one host read a chunk) "
                             "instead of the bare model forward")
    parser.add_argument("--telemetry", choices=["counter", "backend"], default="counter",
                        help="counter: a timed chunk is read by NVML's energy counter at its edges; backend: it "
                             "runs inside the telemetry backend's window as the experiments run it (hw-run's "
                             "sampler thread on; the simulator on the CPU)")
    parser.add_argument("--calibration-s", type=float, default=2.0, help="the cost calibration's time budget")
    parser.add_argument("--quick", action="store_true", help="tiny model and chunk for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.micro_batch, args.seq_len, args.vocab, args.rounds = 4, 2, 32, 256, 2
    check_device_and_sizes(parser, args, ("rows", "micro_batch", "seq_len", "vocab", "rounds"))
    if args.rows % args.micro_batch:
        parser.error("--rows must be a multiple of --micro-batch")
    if args.graphs and (args.chunk_forward or args.dispatch != "grouped" or not args.device.startswith("cuda")):
        parser.error("--graphs needs CUDA and --dispatch grouped, and not --chunk-forward")
    if args.telemetry == "backend" and not args.chunk_forward:
        parser.error("--telemetry backend times the experiment's chunk: it needs --chunk-forward")
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "static-top2" not in args.policies:
        parser.error("--policies must include static-top2 (the reference)")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return args


class EnergyCounter:
    """NVML's total-energy counter of one GPU in joules (read-only); None where NVML is absent."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as exc:  # no NVML: times only
            print(f"# NVML unavailable ({exc}); energy not measured", flush=True)

    def joules(self) -> float | None:
        return None if self.handle is None else self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def kernel_profile(fn, device: torch.device) -> dict | None:
    """CUDA kernels and host ops of one fn() (torch.profiler): {"count", "gpu_us" (the kernels' summed
    device time), "by_name": {kernel name: [launches, device µs]}, "host_by_name": {op name: [calls,
    self host µs]}, "host_us" (the ops' summed self host time)}; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    by_name: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name.setdefault(event.name[:120], [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total
    host = {avg.key[:120]: [avg.count, avg.self_cpu_time_total] for avg in prof.key_averages()
            if avg.self_cpu_time_total > 0}
    return {"count": sum(n for n, _ in by_name.values()), "gpu_us": sum(t for _, t in by_name.values()),
            "by_name": by_name, "host_by_name": host, "host_us": sum(t for _, t in host.values())}


def kernel_difference(profile: dict | None, reference: dict | None, top: int = 12, field: str = "by_name") -> list[dict]:
    """The kernels (`field="host_by_name"`: host ops) whose device (host) time differs most between a
    policy's profile and the reference's: [{"kernel", "launches", "gpu_us" (host ops: "host_us")} as
    policy minus reference], largest absolute difference first."""
    if profile is None or reference is None:
        return []
    names = set(profile[field]) | set(reference[field])
    unit = "gpu_us" if field == "by_name" else "host_us"
    rows = []
    for name in names:
        n, t = profile[field].get(name, (0, 0.0))
        n0, t0 = reference[field].get(name, (0, 0.0))
        if n != n0 or abs(t - t0) > 0:
            rows.append({"kernel": name, "launches": n - n0, unit: round(t - t0, 1)})
    return sorted(rows, key=lambda r: -abs(r[unit]))[:top]


def top_kernels(profile: dict | None, top: int = 12) -> list[dict]:
    """The kernels with the most device time in a profile: [{"kernel", "launches", "gpu_us"}] (where a
    dispatch spends its forward, to compare one dispatch's run with another's)."""
    if profile is None:
        return []
    rows = [{"kernel": name, "launches": n, "gpu_us": round(t, 1)} for name, (n, t) in profile["by_name"].items()]
    return sorted(rows, key=lambda r: -r["gpu_us"])[:top]


def selected_pairs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, the [N, E] bool (token, expert) pairs the routing computes for ids."""
    pairs = []
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for _, layer in model.moe_layers():
        d = layer.last_decision
        chosen = torch.zeros(d.experts.shape[0], d.num_experts, dtype=torch.bool, device=d.experts.device)
        chosen.scatter_(-1, d.experts.long(), d.active)
        pairs.append(chosen.cpu())
    return pairs


class GraphedForward:
    """One policy's forward of a micro-batch [b, T] captured once as a CUDA graph (the grouped dispatch
    and the routers wait for nothing, so the capture holds the whole forward) and replayed on each
    micro-batch's ids: the forward without any host launch cost. The policies' graphs share one memory
    pool (`pool`): they never run at once, and a replay's outputs are not read (timing only), so one
    graph's intermediates may reuse another's memory — one forward's worth instead of one a policy."""

    def __init__(self, model, example: torch.Tensor, pool=None):
        self.ids = example.clone()                                      # [b, T] the graph's input
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():                  # warm-up off the capture stream
            for _ in range(2):
                model(input_ids=self.ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            model(input_ids=self.ids, use_cache=False)

    def __call__(self, ids: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.graph.replay()


ALLOCATOR_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's monotone counters (cudaMalloc and cudaFree calls, allocations that
    had to free the cache and retry — each a device-wide sync); {} off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {key: int(stats.get(key, 0)) for key in ALLOCATOR_KEYS}


class CounterTimer:
    """(seconds, joules or None) of one fn(): wall clock between device syncs, NVML's energy counter."""

    def __init__(self, device: torch.device):
        self.device, self.meter = device, EnergyCounter(device)

    def measure(self, fn) -> tuple[float, float | None]:
        synchronize(self.device)
        j0, t0 = self.meter.joules(), time.perf_counter()
        fn()
        synchronize(self.device)
        t1, j1 = time.perf_counter(), self.meter.joules()
        return t1 - t0, None if j0 is None else j1 - j0

    def close(self) -> None:
        pass


class BackendTimer:
    """(seconds, joules) of one fn() (returning the chunk's workload) run inside the telemetry backend's
    window, as an experiment's chunk runs (on CUDA: NVML with its sampler thread)."""

    def __init__(self, device: torch.device):
        self.backend = telemetry_backend(device)

    def measure(self, fn) -> tuple[float, float | None]:
        window = self.backend.run_chunk(fn)
        return window.duration_s, window_energy_J(window)

    def close(self) -> None:
        self.backend.close()


def telemetry_backend(device: torch.device):
    """NVML on CUDA (read-only), else the simulator (a smoke run's stand-in)."""
    if device.type == "cuda":
        from hw.backend import create
    else:
        from sim.backend import create
    return create()


def measure_cost_table(model, chunk: torch.Tensor, args, device: torch.device) -> CostTable:
    backend = telemetry_backend(device)
    try:
        config = CalibrationConfig(budget_s=args.calibration_s, micro_rows=args.micro_batch, choose_dispatch=False)
        table = calibrate(model, backend, chunk, config,
                          static_router=lambda layer: policy_router("static-top2", layer))
        table.gpu = backend.gpu_name()
    finally:
        backend.close()
    for name, check in table.checks.items():
        print(f"# cost table ({table.seconds:.2f} s, {table.dispatch}): {name} measured {check['measured_s'] * 1e3:.2f} ms, "
              f"predicted {check['predicted_s'] * 1e3:.2f} ms", flush=True)
    return table


def predicted_seconds(model, table: CostTable, ids: torch.Tensor, policy: str) -> float:
    """What `table` predicts for one forward of ids with the installed routers."""
    workload = forward_chunk(model, ids, ids.shape[0], policy, max_sample_tokens=0).workload
    counts = workload.expert_counts()
    slots = model.moe_layers()[0][1].router.max_slots
    return table.predict([counts[i] for i, _ in model.moe_layers()], ids.numel(), slots_per_token=slots)[0]


def bench_router(name: str, layer):
    """A policy's router; `drop-all` (this benchmark's own) is NECTAR's router with an infinite drop
    scale: static top-1's routing through the drop path (the identical-routing pair of static-top1,
    as fixed-price:1e9 is static-top2's)."""
    if name != DROP_ALL:
        return policy_router(name, layer)
    router = policy_router("fixed-price:1e9", layer)
    router.adapt(drop_scale=torch.full((layer.num_experts,), float("inf")))
    return router


def measure_policies(model, chunk: torch.Tensor, args, device: torch.device, table: CostTable) -> list[dict]:
    micro = list(chunk.split(args.micro_batch))
    routers = {name: [bench_router(name, layer) for _, layer in model.moe_layers()] for name in args.policies}

    def forward(ids):
        if args.chunk_forward:       # the experiment's path: recorder, sampled logits, per-row NLL
            forward_chunk(model, ids, args.micro_batch)
            return
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    graphs: dict[str, GraphedForward] = {}      # --graphs: each policy's captured forward
    pool = torch.cuda.graph_pool_handle() if args.graphs else None

    def run_chunk(name: str):
        if args.chunk_forward:
            return forward_chunk(model, chunk, args.micro_batch).workload
        step = graphs.get(name, forward)
        for ids in micro:
            step(ids)
        return None

    static = {}
    info = {}
    for name in args.policies:
        install(model, routers[name])
        run_chunk(name)                                               # warm-up
        pairs = selected_pairs(model, micro[0])
        if name == "static-top2":
            static = pairs
        with count_host_reads() as reads:
            forward(micro[0])
        syncs = count_host_syncs(lambda: forward(micro[0]), device)
        info[name] = {"host_reads_per_forward": sum(reads.values()),
                      "syncs_per_chunk": None if syncs is None else syncs["count"] * len(micro),
                      "sync_sites": None if syncs is None else syncs["sites"],
                      "kernels": kernel_profile(lambda: forward(micro[0]), device),
                      "predicted_s": predicted_seconds(model, table, micro[0], name), "pairs": pairs}
        if args.graphs:
            try:
                graphs[name] = GraphedForward(model, micro[0], pool)
            except RuntimeError as exc:                              # e.g. a host sync inside the forward
                print(f"# {name}: no CUDA graph ({str(exc).splitlines()[0]}); timed eagerly", flush=True)
        info[name]["graphed"] = name in graphs
    times = {name: [] for name in args.policies}
    energy = {name: [] for name in args.policies}
    timer = BackendTimer(device) if args.telemetry == "backend" else CounterTimer(device)
    allocator = {name: {} for name in args.policies}
    try:
        for r in range(args.rounds):
            order = args.policies[r % len(args.policies):] + args.policies[:r % len(args.policies)]
            for name in order:
                install(model, routers[name])
                before = allocator_counts(device)
                seconds, joules = timer.measure(lambda: run_chunk(name))  # noqa: B023  (called at once)
                times[name].append(seconds)
                energy[name].append(joules)
                for key, value in allocator_counts(device).items():
                    allocator[name][key] = allocator[name].get(key, 0) + value - before[key]
            print(f"# round {r + 1}/{args.rounds} done", flush=True)
    finally:
        timer.close()
    for name in args.policies:
        info[name]["allocator"] = allocator[name]
    return _rows(args, chunk.numel(), times, energy, info, static)


def _rows(args, tokens: int, times: dict, energy: dict, info: dict, static: list) -> list[dict]:
    rows = []
    for name in args.policies:
        speed = [t2 / t for t, t2 in zip(times[name], times["static-top2"])]
        has_energy = all(e is not None for e in energy[name])
        e_ratio = [e / e2 for e, e2 in zip(energy[name], energy["static-top2"])] if has_energy else None
        seconds = statistics.median(times[name])
        same = all(torch.equal(a, b) for a, b in zip(info[name]["pairs"], static))
        rows.append({
            "policy": name, "tokens": tokens, "tokens_per_s": tokens / seconds, "speed_vs_top2": statistics.median(speed),
            "J_per_token": statistics.median(energy[name]) / tokens if has_energy else None,
            "energy_vs_top2": statistics.median(e_ratio) if e_ratio else None,
            "syncs_per_chunk": info[name]["syncs_per_chunk"], "sync_sites": info[name]["sync_sites"],
            "host_reads_per_forward": info[name]["host_reads_per_forward"],
            "kernels_per_forward": None if info[name]["kernels"] is None else info[name]["kernels"]["count"],
            "kernel_gpu_us_per_forward": None if info[name]["kernels"] is None else info[name]["kernels"]["gpu_us"],
            "forward_wall_us": seconds * 1e6 * args.micro_batch / args.rows,
            "kernels_vs_top2": kernel_difference(info[name]["kernels"], info["static-top2"]["kernels"]),
            "top_kernels": top_kernels(info[name]["kernels"]),
            "allocator_in_rounds": info[name]["allocator"],
            "host_us_per_forward": None if info[name]["kernels"] is None else info[name]["kernels"]["host_us"],
            "host_ops_vs_top2": kernel_difference(info[name]["kernels"], info["static-top2"]["kernels"],
                                                  field="host_by_name"),
            "same_routing_as_top2": same,
            "slots_per_token": statistics.fmean(float(p.sum()) / p.shape[0] for p in info[name]["pairs"]),
            "predicted_speed_vs_top2": info["static-top2"]["predicted_s"] / info[name]["predicted_s"], "round_s": times[name], "round_speed_vs_top2": speed,
            "round_J": energy[name] if has_energy else None, "dispatch": args.dispatch,
            "fused_router": fused_router.runs_on(args.device), "chunk_forward": args.chunk_forward,
            "telemetry": args.telemetry, "graphs": info[name]["graphed"], "compile_router": args.compile_router})
    return rows


def print_kernel_differences(rows: list[dict]) -> None:
    """Per policy (on CUDA): kernel time against wall time a forward, its kernels' device time against
    static-top2's, and the largest differences."""
    top2 = next(r for r in rows if r["policy"] == "static-top2")
    for row in rows:
        if row["kernel_gpu_us_per_forward"] is None:
            continue
        if any(row["allocator_in_rounds"].values()):
            print(f"# {row['policy']}: allocator in the timed chunks {row['allocator_in_rounds']}", flush=True)
        print(f"# {row['policy']}: {row['kernel_gpu_us_per_forward'] / 1e3:.2f} ms of kernels and "
              f"{row['host_us_per_forward'] / 1e3:.2f} ms of host ops (profiled) in "
              f"{row['forward_wall_us'] / 1e3:.2f} ms a forward", flush=True)
        if row["policy"] == "static-top2":
            continue
        extra = row["kernel_gpu_us_per_forward"] - top2["kernel_gpu_us_per_forward"]
        print(f"# {row['policy']}: kernels {row['kernels_per_forward'] - top2['kernels_per_forward']:+d}, "
              f"device time {extra:+.0f} µs a forward vs static-top2", flush=True)
        for diff in row["kernels_vs_top2"][:6]:
            print(f"#   {diff['gpu_us']:+9.1f} µs {diff['launches']:+4d}×  {diff['kernel']}", flush=True)
        extra = row["host_us_per_forward"] - top2["host_us_per_forward"]
        print(f"# {row['policy']}: host ops {extra:+.0f} µs a forward vs static-top2", flush=True)
        for diff in row["host_ops_vs_top2"][:6]:
            print(f"#   {diff['host_us']:+9.1f} µs {diff['launches']:+4d}×  {diff['kernel']}", flush=True)


def model_and_chunk(args, device: torch.device):
    """(model, chunk [rows, seq_len]): the random-weight experiment shape and random token ids, or a
    saved experiment model (`--model DIR`: `nectar hw-run --save-model DIR`) and its own held-out
    stream (its trained routing on real text: how loaded the experts really are)."""
    if args.model is None:
        gen = torch.Generator().manual_seed(0)
        chunk = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=gen)
        return build_model(args.vocab, args.dtype, device, tiny=args.quick), chunk.to(device)
    from nectar.train.saved_model import load_demo_model

    try:
        demo = load_demo_model(Path(args.model))
    except ValueError as exc:
        raise SystemExit(f"policy_speed: {exc}") from None
    stream = demo.heldout_ids
    needed = args.rows * args.seq_len
    stream = stream.repeat(-(-needed // stream.numel()))[:needed]               # cycled when short
    return demo.model.to(device, args.dtype).eval(), stream.view(args.rows, args.seq_len).to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, chunk = model_and_chunk(args, device)
    for _, layer in model.moe_layers():
        layer.grouped = args.dispatch in ("grouped", "compiled")
        if args.dispatch == "compiled":
            layer.compile_dispatch(True)
        elif args.compile_router:
            layer.compile_router(True)
    if args.dispatch == "compiled" or args.compile_router:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(args.policies))
    env = {**environment(device), "dtype": str(args.dtype).replace("torch.", ""), "rows": args.rows,
           "micro_batch": args.micro_batch, "seq_len": args.seq_len, "rounds": args.rounds, "model": args.model}
    print(f"# {env}", flush=True)
    table = measure_cost_table(model, chunk, args, device)
    rows = [{**row, **env} for row in measure_policies(model, chunk, args, device, table)]
    print(f"{'policy':<18}{'M tok/s':>9}{'vs top2':>9}{'predict':>9}{'energy':>9}{'slots':>7}{'syncs':>7}{'reads':>7}{'kernels':>9}  same")
    for row in rows:
        energy = "" if row["energy_vs_top2"] is None else f"{row['energy_vs_top2']:.3f}"
        print(f"{row['policy']:<18}{row['tokens_per_s'] / 1e6:9.3f}{row['speed_vs_top2']:9.3f}"
              f"{row['predicted_speed_vs_top2']:9.3f}{energy:>9}{row['slots_per_token']:7.2f}"
              f"{str(row['syncs_per_chunk']):>7}{row['host_reads_per_forward']:>7}{str(row['kernels_per_forward']):>9}"
              f"  {row['same_routing_as_top2']}", flush=True)
    print_kernel_differences(rows)
    write_json(args.json_out, rows)
    if args.json_out:
        table_path = table.save(Path(args.json_out).with_suffix(".cost_table.json"))
        print(f"wrote {args.json_out} and {table_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
