"""The captured decode step: one CUDA graph of the whole decode forward per batch size and length bucket.

An eager decode step launches every kernel of the model from Python (hundreds per layer with the
routers, the dispatch and the recorder): on a GPU it is host-bound, so what it measures is launch
overhead, not the bytes routing moves. Here a decode step is one `CUDAGraph.replay()`.

One graph (`StaticDecodeStep`) per (rows R, visible-length bucket Vb):
- inputs: device buffers shared by every graph (`StaticInputs`: token ids, positions and targets
  of up to `slots` rows). A step writes its three host lists into a pinned staging buffer and
  copies them with one non-blocking host-to-device copy; the position ids and the additive mask
  [R, 1, 1, Vb] are built inside the graph from the positions (`SlotCache.for_decode`: row r sees
  its own positions 0..pos_r, everything beyond is masked);
- the captured work: the model's own forward through the slot cache (the new keys/values written
  at each row's position) with the routing recorder on, the log-softmax NLL of each row's target,
  the greedy argmax, and the recorder's per-expert counts and drops as one vector [L·E + L];
- outputs: the graph's own tensors, rewritten by every replay. The step clones the NLL and argmax
  ([R] each) and reads the counts back to the host: the step's one host read, as in the eager path
  (the step's workload needs them).

Shapes: R is exact (1..slots), so no padded row ever enters batch-aware routing or the counts. Vb
is the visible length (1 + the largest position) rounded up to a multiple of `bucket_tokens`
(default 64) and capped at the cache's positions; keys beyond a row's own length are masked, so
the bucket changes which zeros are added, not the result (up to the order of the attention's sums).
An engine captures every (R, Vb) it can meet ahead of a policy's run (`capture_all`: slots ×
ceil(max_tokens / bucket_tokens) graphs, an eager warm-up step before each capture, all in one
memory pool: replays never overlap and every output is copied or read before the next replay); a key
captured later (`prepare_decode`, before the step's telemetry window opens) adds to `capture_s`.

What the controller changes at run time:
- NECTAR's price λ is a 0-d device tensor the batch routers read
  (`nectar.serving.batch_routers.DevicePrice`): a replay uses the price in force;
- a shadow forward (the quality check: the controller's static routers on a read-only cache)
  replays a graph of the *shadow set*: an engine given `shadow_routers` captures, in `capture_all`,
  the same (R, Vb) grid a second time with those routers installed and the cache read-only (each
  layer's attention gets a copy of the visible rows with the new keys written into it; the real
  cache buffers are only read). The graph sets are keyed by (routing signature, read-only): a
  read-only step replays only when the installed routers are exactly the engine's shadow routers
  (the same objects, held by the engine) (`shadow_graph_steps`); any other read-only step runs
  eagerly and is counted (`shadow_eager_steps`);
- any other decode step whose installed routers are not the captured ones (another router
  object, or a price switched to or from ∞), or whose graph was never captured, runs eagerly and
  is counted (`eager_fallbacks`). Prefill chunks are always eager (one request, variable length).

What must hold for a capture (`capture_blocker` says which part fails): a CUDA device of compute
capability ≥ 9.0 in bf16, where `torch._grouped_mm` runs CUTLASS with device-side offsets (older
GPUs and other dtypes take a fallback that reads the offsets to the host); MoE-DistilGPT2 in the
grouped dispatch (the engine switches `layer.grouped` on; the loop dispatch reads the counts to
the host); transformers families with the `grouped_mm` experts implementation (sort, histogram,
grouped GEMM over the sorted rows: each touched expert's weights read once) or `batched_mm`
(capturable, but it gathers weights per token-slot). The `eager` experts implementation
(one_hot, nonzero and a loop over the experts hit) has data-dependent shapes: not capturable.

Mode "static" runs the same step on the same buffers eagerly (no capture; any device), shadow steps
under the same router check: the tests compare it with `ServingEngine.decode` on the CPU.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from nectar.experiment.forward import install
from nectar.serving.engine import ServingEngine, StepResult, recorded_layers

BUCKET_TOKENS = 64
MODES = ("graph", "static")
GROUPED_EXPERTS = ("grouped_mm", "batched_mm")


def length_buckets(max_tokens: int, bucket_tokens: int = BUCKET_TOKENS) -> list[int]:
    """The visible lengths a graph is captured for: multiples of `bucket_tokens`, the last capped."""
    if bucket_tokens < 1 or max_tokens < 1:
        raise ValueError(f"need bucket_tokens >= 1 and max_tokens >= 1, got {bucket_tokens} and {max_tokens}")
    return [min(b, max_tokens) for b in range(bucket_tokens, max_tokens + bucket_tokens, bucket_tokens)]


def bucket_of(visible: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `visible` positions."""
    for bucket in buckets:
        if visible <= bucket:
            return bucket
    raise ValueError(f"visible length {visible} exceeds the largest bucket {buckets[-1]}")


def capture_blocker(model) -> str | None:
    """Why the decode forward of `model` cannot be captured where it is, or None when it can."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return f"the model is on {param.device.type}, not a CUDA device"
    if torch.cuda.get_device_capability(param.device) < (9, 0):
        return "torch._grouped_mm reads its offsets to the host below compute capability 9.0"
    dtype = next((p.dtype for p in model.parameters() if p.dtype != torch.bfloat16), torch.bfloat16)
    if dtype != torch.bfloat16:
        return f"torch._grouped_mm is host-sync-free in bfloat16 only; the model has {dtype} weights"
    layers = {id(layer): layer for _, layer in (*model.moe_layers(), *recorded_layers(model))}
    for layer in layers.values():
        reason = _layer_blocker(layer, param)
        if reason:
            return reason
    return None


def _layer_blocker(layer, param: torch.Tensor) -> str | None:
    if hasattr(layer, "experts_module"):                         # a transformers family (nectar.hf)
        from nectar.hf.drop import experts_implementation

        impl = experts_implementation(layer.experts_module)
        if impl not in GROUPED_EXPERTS:
            return (f"the {impl!r} experts implementation has data-dependent shapes (one_hot, nonzero, a loop "
                    f"over the experts hit); use grouped_mm")
        return None
    from nectar.moe.dispatch import dispatch_path

    probe = torch.empty(1, layer.d_model, device=param.device, dtype=param.dtype)
    if dispatch_path(probe, layer.experts, True) != "grouped":
        return "MoE-DistilGPT2's grouped dispatch cannot run these experts here; the loop dispatch reads counts"
    return None


def routing_signature(model) -> tuple:
    """What a captured graph bakes in about routing: each MoE layer's router object, and whether its
    price is ∞ (no priced slots: another computation). A price's finite value is device data."""
    return routers_signature([layer.router for _, layer in model.moe_layers()])


def routers_signature(routers: list) -> tuple:
    """`routing_signature` of a model whose MoE layers hold `routers` (in layer order)."""
    return tuple((id(router), getattr(router, "price", 0.0) == math.inf) for router in routers)


@dataclass
class GraphStats:
    """How an engine's decode steps ran (the per-policy figures of the serving report)."""

    graphs: bool                     # decode steps replay CUDA graphs
    capture_s: float = 0.0           # wall seconds spent capturing (warm-ups included, both sets), outside every window
    graphs_captured: int = 0         # the policy's set
    graph_steps: int = 0             # decode steps replayed
    eager_fallbacks: int = 0         # decode steps run eagerly although graphs were on (routers changed, no graph)
    shadow_graphs_captured: int = 0  # the shadow set (static routers, read-only cache)
    shadow_graph_steps: int = 0      # read-only shadow forwards (quality checks) replayed
    shadow_eager_steps: int = 0      # read-only shadow forwards run eagerly (not the shadow routers, no graph)
    bucket_tokens: int = BUCKET_TOKENS


class StaticInputs:
    """Device buffers of a decode step's inputs for up to `rows_max` rows, one flat [3·rows_max] long
    tensor (ids, positions, targets of R rows: its first 3R entries), and a pinned staging copy."""

    def __init__(self, rows_max: int, device: torch.device):
        on_cuda = device.type == "cuda"
        self.device_X = torch.zeros(3 * rows_max, dtype=torch.long, device=device)
        self.host_X = torch.zeros(3 * rows_max, dtype=torch.long, pin_memory=on_cuda)
        self.copied = torch.cuda.Event() if on_cuda else None

    def views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [R], positions [R], targets [R]): views of the device buffer."""
        return self.device_X[:rows], self.device_X[rows:2 * rows], self.device_X[2 * rows:3 * rows]

    def load(self, tokens: list[int], positions: list[int], targets: list[int]) -> None:
        """Host lists → staging → device (one non-blocking copy, ordered before the next replay)."""
        rows = len(tokens)
        if self.copied is not None:
            self.copied.synchronize()                        # the previous copy has left the staging buffer
        self.host_X[:3 * rows] = torch.tensor(tokens + positions + targets, dtype=torch.long)
        self.device_X[:3 * rows].copy_(self.host_X[:3 * rows], non_blocking=True)
        if self.copied is not None:
            self.copied.record()


@dataclass
class StepOutputs:
    """A static step's outputs: NLL [R] fp32, argmax [R] long, routing [L·E + L] long (counts, drops),
    and with the engine's `step_logp` the next-token log-probs [R, V] fp32 (else None: a captured
    graph keeps its outputs alive, R·V floats each)."""

    nll_R: torch.Tensor
    argmax_R: torch.Tensor
    routing_X: torch.Tensor
    logp_RV: torch.Tensor | None = None


class StaticDecodeStep:
    """The decode step of R rows at visible bucket Vb on the static buffers: eager or captured."""

    def __init__(self, engine: ServingEngine, inputs: StaticInputs, rows: int, bucket: int):
        self.engine, self.inputs, self.rows, self.bucket = engine, inputs, rows, bucket
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: StepOutputs | None = None

    def compute(self) -> StepOutputs:
        """The forward, NLL, argmax and routing counts from the buffers (what a graph captures)."""
        engine, model = self.engine, self.engine.model
        ids_R, positions_R, targets_R = self.inputs.views(self.rows)
        position_ids, mask = engine.cache.for_decode(positions_R, self.bucket)   # [R, 1], [R, 1, 1, Vb]
        recorder = model.new_recorder(max_sample_tokens=0)
        with model.recording(recorder):
            out = model(input_ids=ids_R[:, None], position_ids=position_ids, attention_mask=mask, use_cache=True,
                        logits_to_keep=1, **{engine._cache_kw: engine.cache})
        logits_RV = out.logits[:, -1]
        logp_RV = torch.log_softmax(logits_RV.float(), dim=-1)                      # [R, V]
        nll_R = -logp_RV.gather(-1, targets_R[:, None])[:, 0]
        records = recorder.records
        routing_X = torch.cat([torch.stack([r.counts_E for r in records]).reshape(-1),
                               torch.stack([r.dropped for r in records]).reshape(-1).long()])
        return StepOutputs(nll_R, logits_RV.argmax(-1), routing_X, logp_RV if engine.step_logp else None)

    def capture(self, pool, stream: torch.cuda.Stream) -> None:
        """Record the step into a CUDA graph, after one eager run of this very shape on the capture
        stream: lazy initialisations, probes, cached weights and first kernel loads happen outside
        the graph (one warm-up per row count was not enough on the H100: a new bucket invalidated a
        capture)."""
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.compute()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with no_collection(), torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.outputs = self.compute()
        self.graph = graph

    def run(self) -> StepOutputs:
        if self.graph is None:
            return self.compute()
        self.graph.replay()
        return self.outputs


@contextmanager
def no_collection():
    """Python's cyclic garbage collector held off: a collection inside a capture can free an
    earlier engine's graphs and memory (a CUDA call the capturing stream forbids), which
    invalidates the capture — seen on the H100 when a test's engines were collected mid-capture."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphedServingEngine(ServingEngine):
    """`ServingEngine` whose decode steps replay CUDA graphs (mode "graph") or run the same static
    step eagerly (mode "static"); prefill chunks are the eager engine's. With `shadow_routers` (one
    per MoE layer: the controller's static routers) read-only shadow forwards have their own graph
    set; without, they run eagerly. `step_logp`: the static steps output their log-probs too (a
    controller's vocabulary-KL checks read them; `ServingEngine.keep_logp`)."""

    def __init__(self, model, slots: int, max_tokens: int, policy: str = "", mode: str = "graph",
                 bucket_tokens: int = BUCKET_TOKENS, shadow_routers: list | None = None, step_logp: bool = False):
        super().__init__(model, slots, max_tokens, policy)
        self.step_logp = step_logp
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if shadow_routers is not None and len(shadow_routers) != len(model.moe_layers()):
            raise ValueError(f"{len(shadow_routers)} shadow routers for {len(model.moe_layers())} MoE layers")
        self.mode, self.buckets = mode, length_buckets(max_tokens, bucket_tokens)
        self.inputs = StaticInputs(slots, self.device)
        self.steps: dict[tuple[int, int], StaticDecodeStep] = {}          # the policy's set
        self.shadow_steps: dict[tuple[int, int], StaticDecodeStep] = {}   # the shadow set (read-only cache)
        self.stats = GraphStats(graphs=mode == "graph", bucket_tokens=bucket_tokens)
        self._signature: tuple | None = None
        self._captured_routers: list = []        # held, so that the signature's ids stay theirs
        self.shadow_routers = None if shadow_routers is None else list(shadow_routers)
        self._shadow_signature = None if shadow_routers is None else routers_signature(self.shadow_routers)
        if mode == "graph":
            self._start_graphs()

    def _start_graphs(self) -> None:
        for _, layer in self.model.moe_layers():
            if hasattr(layer, "grouped"):
                layer.grouped = True                         # MoE-DistilGPT2: the sync-free dispatch
        reason = capture_blocker(self.model)
        if reason:
            raise ValueError(f"cannot capture the decode step: {reason}")
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)

    # ------------------------------------------------------------------ capture
    def capture_all(self) -> float:
        """Capture every (rows, bucket) this engine can meet, then the same grid for the shadow (with
        `shadow_routers`); wall seconds (added to capture_s). The policy's warm-ups write keys at
        position 0 of the slots (the shadow's write nothing): call it before any request is prefilled."""
        grid = [(rows, bucket) for rows in range(1, self.cache.slots + 1) for bucket in self.buckets]
        gc.collect()                                 # earlier engines' graphs freed now, not during a capture

        def work():
            for key in grid:
                self._capture(*key)
            if self.shadow_routers is not None:
                with self.shadow():
                    for key in grid:
                        self._capture(*key, shadow=True)
        return self._timed(work)

    @contextmanager
    def shadow(self):
        """The shadow routers installed and the cache read-only (what `ServingController.wrap_decode`
        sets up for a check); the routers and mode in force before are restored after."""
        if self.shadow_routers is None:
            raise ValueError("this engine has no shadow routers")
        before = [layer.router for _, layer in self.model.moe_layers()]
        read_only = self.cache.read_only
        install(self.model, self.shadow_routers)
        self.cache.read_only = True
        try:
            yield
        finally:
            self.cache.read_only = read_only
            install(self.model, before)

    def prepare_decode(self, tokens: list[int], positions: list[int], targets: list[int]) -> float:
        """Capture the step's graph if it is missing (before its telemetry window: a warm-up runs the
        step itself, which writes what the replay writes again); wall seconds spent. The shadow set
        is captured by `capture_all` only."""
        key = (len(tokens), bucket_of(max(positions) + 1, self.buckets))
        if self.mode != "graph" or key in self.steps or not self._routers_captured():
            return 0.0
        self.inputs.load(tokens, positions, targets)
        return self._timed(lambda: self._capture(*key))

    def _timed(self, work) -> float:
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            work()
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.stats.capture_s += seconds
        return seconds

    def _capture(self, rows: int, bucket: int, shadow: bool = False) -> None:
        steps = self.shadow_steps if shadow else self.steps
        if (rows, bucket) in steps:
            return
        if shadow:
            if not (self.cache.read_only and self._shadow_installed()):
                raise RuntimeError("the shadow set is captured with the shadow routers on a read-only cache")
        elif self._signature is None:
            self._signature = routing_signature(self.model)
            self._captured_routers = [layer.router for _, layer in self.model.moe_layers()]
        step = StaticDecodeStep(self, self.inputs, rows, bucket)
        try:
            step.capture(self.pool, self.stream)
        except RuntimeError as exc:
            what = "shadow step (static routers, read-only cache)" if shadow else "decode step"
            raise RuntimeError(f"capturing the {what} of {rows} rows at {bucket} positions failed "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                               "--cuda-graphs off serves on the eager path") from exc
        steps[(rows, bucket)] = step
        if shadow:
            self.stats.shadow_graphs_captured += 1
        else:
            self.stats.graphs_captured += 1

    def _routers_captured(self) -> bool:
        return self._signature is None or self._signature == routing_signature(self.model)

    def _shadow_installed(self) -> bool:
        """The installed routers are exactly the shadow routers (the same objects, ∞ prices alike)."""
        return self._shadow_signature is not None and self._shadow_signature == routing_signature(self.model)

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: list[int], positions: list[int], targets: list[int]) -> StepResult:
        """One decode step (see `ServingEngine.decode`): a replay, or the static step eagerly. On a
        read-only cache (a shadow forward) the shadow set's, when the shadow routers are installed."""
        shadow = self.cache.read_only
        step = self._step(len(tokens), bucket_of(max(positions) + 1, self.buckets), shadow)
        if step is None:
            if shadow:
                self.stats.shadow_eager_steps += 1
            else:
                self.stats.eager_fallbacks += 1
            return super().decode(tokens, positions, targets)
        self.inputs.load(tokens, positions, targets)
        with torch.no_grad():
            out = step.run()
            nll_R, argmax_R = out.nll_R.clone(), out.argmax_R.clone()      # the next replay rewrites them
            logp_RV = out.logp_RV.clone() if self.keep_logp and out.logp_RV is not None else None
        if shadow:
            self.stats.shadow_graph_steps += step.graph is not None
        else:
            self.stats.graph_steps += step.graph is not None
        return StepResult(nll_R, argmax_R, self._routing_workload(out.routing_X.tolist(), positions), logp_RV)

    def _step(self, rows: int, bucket: int, shadow: bool = False) -> StaticDecodeStep | None:
        """The step of the graph set keyed by (the installed routers, read-only), or None (eager)."""
        if shadow:
            if not self._shadow_installed():
                return None
            steps = self.shadow_steps
        else:
            if self.mode == "graph" and not self._routers_captured():
                return None
            steps = self.steps
        if self.mode == "static":
            return steps.setdefault((rows, bucket), StaticDecodeStep(self, self.inputs, rows, bucket))
        return steps.get((rows, bucket))

    def _routing_workload(self, routing: list[int], positions: list[int]):
        """The step's workload from the routing vector [Σ E_l counts, then L drops]."""
        counts, start = [], 0
        for _, layer in recorded_layers(self.model):
            counts.append(routing[start:start + layer.num_experts])
            start += layer.num_experts
        return self.decode_workload(counts, routing[start:], positions)

    def graph_summary(self) -> dict:
        return asdict(self.stats)
