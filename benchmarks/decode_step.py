"""Benchmark: one serving decode step, eager vs captured (CUDA graphs), and its share of HBM bandwidth.

Models, random weights (a step's time does not depend on training; random gates route each token
to near-uniformly random experts, so more distinct experts are touched than a trained router's
batch would touch), bf16 with the `grouped_mm` experts implementation, NECTAR attached:
- `small`: the OLMoE-style model `nectar.hf.train_small` trains (4 layers, hidden 512, 64 experts
  of 128, top-8, vocabulary 16384);
- `olmoe-1b-7b`: the OLMoE-1B-7B shape (16 layers, hidden 2048, 16 heads, 64 experts of 1024,
  top-8, vocabulary 50304); `--big-layers N` builds N layers instead (the JSON says how many).
Built directly on the device (no CPU copy of the weights).

Per model and batch B: B rows decode from about `--context` cached positions (the KV cache holds
random values; each row starts a few positions apart, and the positions advance one per step
inside one length bucket), teacher-forced on random tokens, routed by the family's top-8
(`static-top8`). Each row of the JSON:
  eager_ms      wall time per step of `ServingEngine.decode` (what `nectar serve` ran so far: the
                inputs' copy, the eager forward, NLL and argmax, the routing counts read back)
  graph_ms      the same for `GraphedServingEngine.decode` (inputs staged and copied, one replay,
                the outputs cloned, the counts read back: the whole serving step)
  replay_ms     device time of one replay alone (CUDA events over back-to-back replays)
  capture_s     warm-up + capture of the step's graph (once; outside every timed step)
  bytes_per_step what the step must read (`nectar.serving.frontier.step_bytes`): the weights of
                the distinct experts it touched (mean over the timed steps), attention and
                embedding/LM-head weights, and the KV positions the rows attend to
  hbm_fraction  bytes_per_step / graph_ms / peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s, by
                device name); hbm_fraction_replay and hbm_fraction_eager with replay_ms / eager_ms
  distinct_experts, slots  mean per MoE layer and step: experts touched, (token, expert) pairs
  eager_fallbacks timed captured-path steps that ran eagerly (0: every graph was captured ahead)
Then, at `--policy-batch` (16) in the captured path, one row per routing policy: static-top8, 4,
2, 1 and batch-aware:8 (a token keeps its top-1 and only further experts the batch reads anyway):
whether a step now pays per expert read (distinct experts) rather than per token slot.

    PYTHONPATH=. python benchmarks/decode_step.py --device cuda --json-out runs/decode_step.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, synchronize, write_json  # noqa: E402

from nectar.cli.serve import hbm_for  # noqa: E402
from nectar.experiment.forward import install  # noqa: E402
from nectar.hf.attach import attach  # noqa: E402
from nectar.hf.train_small import SmallMoERecipe, olmoe_config  # noqa: E402
from nectar.models.shapes import SHAPES  # noqa: E402
from nectar.serving.engine import ServingEngine  # noqa: E402
from nectar.serving.frontier import routers_for, step_bytes  # noqa: E402
from nectar.serving.graphs import GraphedServingEngine, bucket_of  # noqa: E402

BIG = SHAPES["olmoe-1b-7b"]   # the one definition of the shape (nectar.models.shapes)
ROW_SPREAD = 8          # row r starts (r mod 8) positions before the context length
WARMUP_STEPS = 2        # untimed decode steps before each timed run


@dataclass
class StepRow:
    """One (model, batch, policy) measurement (see the module docstring)."""

    batch: int
    policy: str
    eager_ms: float | None
    graph_ms: float | None
    replay_ms: float | None
    capture_s: float | None
    bytes_per_step: float
    distinct_experts: float
    slots: float
    hbm_fraction: float | None = None
    hbm_fraction_replay: float | None = None
    hbm_fraction_eager: float | None = None
    eager_fallbacks: int = 0         # timed captured-path steps that ran eagerly (should be 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small,olmoe-1b-7b", help="comma list of small, olmoe-1b-7b")
    p.add_argument("--big-layers", type=int, default=BIG.layers, help="layers of the OLMoE-1B-7B shape (16: the real depth)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--policy-batch", type=int, default=16, help="batch of the per-policy rows (0: none)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 4, 2, 1], help="static top-k of the per-policy rows")
    p.add_argument("--context", type=int, default=192, help="cached positions per row when decoding starts")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per measurement")
    p.add_argument("--eager-steps", type=int, default=8, help="timed eager decode steps per measurement")
    p.add_argument("--bucket", type=int, default=64, help="visible-length bucket of the captured steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - {"small", "olmoe-1b-7b"} or args.context < ROW_SPREAD:
        p.error("--models takes small and olmoe-1b-7b; --context must be >= 8")
    return args


def build(name: str, args: argparse.Namespace):
    """The attached random-weight model, on the device, in bf16 (fp32 on a CPU)."""
    from transformers import OlmoeForCausalLM

    if name == "small":
        config = olmoe_config(SmallMoERecipe(), vocab_size=16384, eos_token_id=0)
    else:
        config = BIG.with_layers(args.big_layers).olmoe_config()
    config.output_router_logits = False                      # inference: no auxiliary loss in the forward
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    with torch.device(args.device):
        model = OlmoeForCausalLM._from_config(config, dtype=dtype).eval()
    model.set_experts_implementation("grouped_mm")
    return attach(model)


def max_tokens(args: argparse.Namespace) -> int:
    """Cache positions: the context and every step, rounded up to a whole bucket."""
    need = args.context + WARMUP_STEPS + max(args.steps, args.eager_steps)
    return -(-need // args.bucket) * args.bucket


def step_inputs(batch: int, context: int, vocab: int, steps: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Random teacher-forced (tokens, positions, targets) of B rows for `steps` steps: row r starts
    at context - 1 - (r mod 8) and every row advances one position a step."""
    gen = torch.Generator().manual_seed(batch)
    start = [context - 1 - (r % ROW_SPREAD) for r in range(batch)]
    out = []
    for s in range(steps):
        tokens = torch.randint(0, vocab, (2, batch), generator=gen).tolist()
        out.append((tokens[0], [p + s for p in start], tokens[1]))
    return out


def fill_cache(engine: ServingEngine) -> None:
    """Random keys and values in every slot (what the rows attend to; values do not change the time)."""
    for buf in (*engine.cache.keys, *engine.cache.values):
        buf.normal_()


def capture_ahead(engine: GraphedServingEngine, schedule: list) -> float:
    """Capture the graph of every (rows, bucket) the schedule meets, before any timed step: seconds."""
    first = {}
    for step in schedule:
        first.setdefault(bucket_of(max(step[1]) + 1, engine.buckets), step)
    return sum(engine.prepare_decode(*step) for step in first.values())


def timed_steps(engine: ServingEngine, schedule: list) -> tuple[float, list]:
    """Seconds per decode step (wall, back-to-back, each step reads its counts) after WARMUP_STEPS
    untimed ones, and the timed steps' workloads."""
    for step in schedule[:WARMUP_STEPS]:
        engine.decode(*step)
    synchronize(engine.device)
    start = time.perf_counter()
    workloads = [engine.decode(*step).workload for step in schedule[WARMUP_STEPS:]]
    synchronize(engine.device)
    return (time.perf_counter() - start) / len(workloads), workloads


def replay_seconds(engine: GraphedServingEngine, batch: int, visible: int, replays: int = 20) -> float | None:
    """Device seconds per replay of the (batch, bucket) graph, back to back."""
    step = engine.steps.get((batch, bucket_of(visible, engine.buckets)))
    if step is None or step.graph is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    step.graph.replay()
    start.record()
    for _ in range(replays):
        step.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def routing_means(workloads: list) -> tuple[float, float, float]:
    """(bytes per step, distinct experts per MoE layer, slots per MoE layer), means over the steps."""
    moe = [[layer for layer in w.layers if len(layer.tokens_per_expert) > 1] for w in workloads]
    distinct = statistics.mean(sum(n > 0 for n in layer.tokens_per_expert) for layers in moe for layer in layers)
    slots = statistics.mean(sum(layer.tokens_per_expert) for layers in moe for layer in layers)
    return statistics.mean(step_bytes(w) for w in workloads), distinct, slots


def measure(model, batch: int, policy: str, args: argparse.Namespace, eager: bool) -> StepRow:
    """One row: the captured (or, on a CPU, the static) step, and the eager step when asked."""
    install(model, routers_for(model, policy))
    vocab, cuda = int(model.config.vocab_size), torch.device(args.device).type == "cuda"
    graphed = GraphedServingEngine(model, batch, max_tokens(args), policy, mode="graph" if cuda else "static",
                                   bucket_tokens=args.bucket)
    fill_cache(graphed)
    schedule = step_inputs(batch, args.context, vocab, WARMUP_STEPS + args.steps)
    capture_s = capture_ahead(graphed, schedule) if cuda else None
    graph_s, workloads = timed_steps(graphed, schedule)
    replay_s = replay_seconds(graphed, batch, max(schedule[-1][1]) + 1) if cuda else None
    fallbacks = graphed.stats.eager_fallbacks
    del graphed
    gc.collect()                                             # the engine and its steps refer to each other
    eager_s = None
    if eager:
        engine = ServingEngine(model, batch, max_tokens(args), policy)
        fill_cache(engine)
        eager_s, _ = timed_steps(engine, step_inputs(batch, args.context, vocab, WARMUP_STEPS + args.eager_steps))
        del engine
    if cuda:
        torch.cuda.empty_cache()
    row = fraction_row(batch, policy, eager_s, graph_s if cuda else None, replay_s, capture_s, workloads, args)
    row.eager_fallbacks = fallbacks
    return row


def fraction_row(batch, policy, eager_s, graph_s, replay_s, capture_s, workloads, args) -> StepRow:
    bytes_step, distinct, slots = routing_means(workloads)
    peak = hbm_for(environment(args.device)["device"])
    ms = lambda s: None if s is None else 1e3 * s                              # noqa: E731
    share = lambda s: None if s is None or not peak else bytes_step / s / (peak * 1e9)  # noqa: E731
    return StepRow(batch, policy, ms(eager_s), ms(graph_s), ms(replay_s), capture_s, bytes_step, distinct, slots,
                   share(graph_s), share(replay_s), share(eager_s))


def print_row(name: str, row: StepRow) -> None:
    fmt = lambda v, f: f"{'-':>{int(f.split('.')[0])}}" if v is None else format(v, f)  # noqa: E731
    print(f"{name:<12}{row.batch:>5} {row.policy:<15}{fmt(row.eager_ms, '9.2f')}{fmt(row.graph_ms, '9.2f')}"
          f"{fmt(row.replay_ms, '10.3f')}{row.bytes_per_step / 1e6:>10.1f}{row.distinct_experts:>8.1f}"
          f"{row.slots:>8.1f}{fmt(row.hbm_fraction, '8.3f')}{fmt(row.hbm_fraction_replay, '8.3f')}", flush=True)


def run_model(name: str, args: argparse.Namespace) -> dict:
    model = build(name, args)
    top_k = model.top_k
    info = {"name": name, "layers": int(model.config.num_hidden_layers), "hidden": int(model.config.hidden_size),
            "experts": int(model.config.num_experts), "expert_hidden": int(model.config.intermediate_size),
            "top_k": top_k, "vocab": int(model.config.vocab_size),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    rows = []
    for batch in args.batches:
        rows.append(measure(model, batch, f"static-top{top_k}", args, eager=True))
        print_row(name, rows[-1])
    policies = []
    names = [f"static-top{k}" for k in args.ks if k <= top_k] + [f"batch-aware:{top_k}"]
    for policy in names if args.policy_batch else []:
        policies.append(measure(model, args.policy_batch, policy, args, eager=False))
        print_row(name, policies[-1])
    del model
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return {**info, "rows": [asdict(r) for r in rows], "policies": [asdict(r) for r in policies]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    peak = hbm_for(env["device"])
    print(f"{env['device']}: peak {peak} GB/s; context {args.context}, bucket {args.bucket}, {args.steps} steps")
    print(f"{'model':<12}{'batch':>5} {'policy':<15}{'eager ms':>9}{'graph ms':>9}{'replay ms':>10}{'MB/step':>10}"
          f"{'experts':>8}{'slots':>8}{'hbm':>8}{'hbm rp':>8}")
    models = []
    with torch.no_grad():
        for name in args.models:
            models.append(run_model(name, args))
            write_json(args.json_out, payload(env, peak, args, models))
    return 0


def payload(env: dict, peak: float | None, args: argparse.Namespace, models: list[dict]) -> dict:
    return {"environment": env, "peak_GBps": peak, "context": args.context, "bucket": args.bucket,
            "steps": args.steps, "eager_steps": args.eager_steps, "weights": "random (routing near-uniform)",
            "models": models}


if __name__ == "__main__":
    raise SystemExit(main())
