"""What one chunk of inference asked of the GPU: the record the core hands to a backend.

The simulator prices exactly this record (it never re-derives routing), and hardware traces
store it beside their measurements so that a run can be replayed through the simulator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ExpertCost:
    """Cost of one token through one expert: forward FLOPs and bytes moved (weights amortised
    over the tokens of a chunk are not included; `weight_bytes` is reported separately)."""

    flops: float
    bytes: float
    weight_bytes: float = 0.0
    kind: str = "ffn"  # "ffn" | "zero" | "copy" | "constant" | "lact"


def widest_ffn_flops(costs: "list[ExpertCost]") -> float:
    """FLOPs per token of the widest "ffn" expert among `costs`, else the largest of all (the scale
    "cheap" and "narrow" are measured against: a LaCT expert is costlier than an FFN but not wider)."""
    ffn = [c.flops for c in costs if c.kind == "ffn"]
    return max(ffn or [c.flops for c in costs])


@dataclass
class LayerWorkload:
    """One MoE (or dense) block's feed-forward work for the chunk."""

    tokens_per_expert: list[int]          # [E] tokens routed to each expert (after drops)
    expert_costs: list[ExpertCost]        # [E]
    router_flops_per_token: float = 0.0
    dropped_tokens: int = 0


@dataclass
class ChunkWorkload:
    """Everything a backend needs to price or run one chunk.

    tokens = batch * seq_len. A teacher-forced chunk (the defaults) attends causally within each
    sequence, and every token's logits go through the LM head and the loss. A serving step says
    what differs: `attention_pairs` (query, key) position pairs summed over the chunk's sequences
    (None = the causal batch·seq_len·(seq_len+1)/2), `kv_read_tokens` cached K/V positions its
    queries read per layer, `logit_tokens` rows through the LM head (None = all tokens plus the
    loss; an int = those rows and a greedy argmax, no loss), and `phase` for reporting.
    Decode step of B requests with contexts c_b: tokens = batch = B, seq_len = 1,
    attention_pairs = Σ(c_b + 1), kv_read_tokens = Σ c_b, logit_tokens = B, phase = "decode".
    Prefill of q tokens after p0 cached ones: tokens = seq_len = q, batch = 1,
    attention_pairs = q·p0 + q(q+1)/2, kv_read_tokens = p0, logit_tokens = 1, phase = "prefill".
    `before` is another forward that ran earlier in the same telemetry window (a serving step's
    ride-along quality check): a backend prices or replays `forwards()`, each as its own forward
    (weights read again, launches paid again), never one merged batch.
    """

    tokens: int
    batch: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    layers: list[LayerWorkload] = field(default_factory=list)  # one per block, in order
    dtype_bytes: int = 2
    policy: str = ""
    attention_pairs: float | None = None   # None = causal within each sequence
    kv_read_tokens: int = 0                # cached K/V positions read per layer
    logit_tokens: int | None = None        # None = every token's logits and the loss
    phase: str = ""                        # "prefill" | "decode" | "" (teacher-forced)
    before: "ChunkWorkload | None" = None  # a forward run earlier in the same window (a ride-along check)

    def query_key_pairs(self) -> float:
        """(query, key) position pairs the attention computes, per head-agnostic unit."""
        if self.attention_pairs is not None:
            return self.attention_pairs
        return self.batch * self.seq_len * (self.seq_len + 1) / 2

    def logit_rows(self) -> int:
        """Rows that go through the LM head."""
        return self.tokens if self.logit_tokens is None else self.logit_tokens

    def expert_counts(self) -> list[list[int]]:
        """Per-layer per-expert token counts, [L][E]."""
        return [list(layer.tokens_per_expert) for layer in self.layers]

    def forwards(self) -> list["ChunkWorkload"]:
        """The forwards this window ran, in order, each without `before`."""
        earlier = [] if self.before is None else self.before.forwards()
        return [*earlier, replace(self, before=None)]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ChunkWorkload":
        layers = [
            LayerWorkload(
                tokens_per_expert=list(l["tokens_per_expert"]),
                expert_costs=[ExpertCost(**c) for c in l["expert_costs"]],
                router_flops_per_token=l.get("router_flops_per_token", 0.0),
                dropped_tokens=l.get("dropped_tokens", 0),
            )
            for l in d.get("layers", [])
        ]
        rest = {k: v for k, v in d.items() if k not in ("layers", "before")}
        before = d.get("before")
        return ChunkWorkload(layers=layers, before=None if before is None else ChunkWorkload.from_dict(before), **rest)


def chained(forwards: list[ChunkWorkload]) -> ChunkWorkload:
    """The last of `forwards` with the earlier ones as its `before` chain (inverse of `forwards()`)."""
    if not forwards:
        raise ValueError("chained needs at least one workload")
    out = replace(forwards[0], before=None)
    for w in forwards[1:]:
        out = replace(w, before=out)
    return out


def _merged_serving_fields(workloads: list[ChunkWorkload]) -> dict:
    """Attention pairs, KV reads and logit rows add up (None stays None only if all are None)."""
    if len({w.phase for w in workloads}) > 1:
        raise ValueError(f"cannot merge workloads of different phases {sorted({w.phase for w in workloads})}")
    pairs = None if all(w.attention_pairs is None for w in workloads) else sum(w.query_key_pairs() for w in workloads)
    logits = None if all(w.logit_tokens is None for w in workloads) else sum(w.logit_rows() for w in workloads)
    return {"attention_pairs": pairs, "kv_read_tokens": sum(w.kv_read_tokens for w in workloads),
            "logit_tokens": logits, "phase": workloads[0].phase}


def merge_workloads(workloads: list[ChunkWorkload], policy: str = "") -> ChunkWorkload:
    """One workload for several chunks run back to back (a long calibration window): token
    counts, attention pairs, KV reads and logit rows add up, shapes and expert costs are those of
    the first chunk; a workload's `before` forwards are merged in too."""
    if not workloads:
        raise ValueError("merge_workloads needs at least one workload")
    workloads = [part for w in workloads for part in w.forwards()]
    first = workloads[0]
    if any(len(w.layers) != len(first.layers) for w in workloads):
        raise ValueError("cannot merge workloads with different numbers of layers")
    layers = [
        LayerWorkload(
            tokens_per_expert=[sum(counts) for counts in zip(*(w.layers[i].tokens_per_expert for w in workloads))],
            expert_costs=list(first.layers[i].expert_costs),
            router_flops_per_token=first.layers[i].router_flops_per_token,
            dropped_tokens=sum(w.layers[i].dropped_tokens for w in workloads),
        )
        for i in range(len(first.layers))
    ]
    return ChunkWorkload(
        tokens=sum(w.tokens for w in workloads), batch=sum(w.batch for w in workloads), seq_len=first.seq_len,
        d_model=first.d_model, n_layers=first.n_layers, n_heads=first.n_heads, vocab_size=first.vocab_size,
        layers=layers, dtype_bytes=first.dtype_bytes, policy=policy or first.policy,
        **_merged_serving_fields(workloads))
