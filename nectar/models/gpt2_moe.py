"""MoE-DistilGPT2: a Hugging Face GPT-2 language model whose chosen blocks' MLP is a MoELayer.

`MoEGPT2LMHeadModel` *is* a `GPT2LMHeadModel` (same embeddings, attention, LM head, KV cache,
`generate()`, `save_pretrained`/`from_pretrained`); only `block.mlp` of the blocks listed in
`config.moe_layers` is replaced by `MoEMLP`, a thin adapter around `nectar.moe.layer.MoELayer`
(GPT-2 calls `block.mlp(hidden [B, T, D])` and expects a tensor back).

- `from_dense` performs sparse upcycling (Komatsuzaki et al. 2022): every weight of a dense GPT-2
  is copied, every GELU expert of an MoE block starts as a copy of that block's MLP, and the new
  gate is initialised small. With identical experts and renormalised gates the logits equal the
  dense model's whatever the gate says.
- Routers are runtime policy, not weights: `set_router` / `set_router_by_name` swap them without
  touching the gates (the saved config records the router the model was built/trained with).
- `chunk_workload` turns the last forward into the `ChunkWorkload` a telemetry backend prices.
- A forward given no position ids (the experiment's `model(input_ids=ids, use_cache=False)`)
  skips transformers' packed-sequence check, its one host read (`nectar.models.default_positions`;
  same logits): with the grouped dispatch such a forward queues on the GPU without a sync.
- Loading is strict and deterministic: `from_pretrained` refuses weights that do not cover the
  config (missing, unexpected or mis-shaped tensors) and rebuilds every router from the config
  after the weights are in (a router's buffers are not weights: transformers would otherwise
  leave them as uninitialised memory). A router's trained `selection_bias` (auxiliary-loss-free
  balancing) travels in the config (`router_selection_bias`). `save_pretrained` also writes
  `auto_map` and a two-line `nectar_remote.py`, so `trust_remote_code=True` loads the checkpoint
  with the installed `nectar` package and no `import nectar`.

The config names its top-k / top-p fields `moe_top_k` / `moe_top_p`: `top_k` and `top_p` are
generation parameters in transformers, which refuses to save a model config that sets them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from nectar.lact.expert import LaCTMoEExpert  # noqa: F401  (registers the "lact" expert kind for configs)
from nectar.lact.hybrid_attention import HybridLaCTAttention
from nectar.models.default_positions import default_positions
from nectar.moe.expert_pool import ConstantGroup, ExpertPool, GELUGroup, SwiGLUGroup
from nectar.moe.experts import ExpertSpec, GELUExpert
from nectar.moe.layer import MoELayer, MoEMetrics
from nectar.moe.recorder import RoutingRecorder
from nectar.moe.static_routers import ROUTERS, TopKRouter, TopPRouter, make_router
from nectar.moe.router import Router
from nectar.telemetry.workload import ChunkWorkload, LayerWorkload

MODEL_TYPE = "nectar_moe_gpt2"
DEFAULT_ROUTER_INIT_STD = 1e-3
ATTENTION_TYPES = ("gpt2", "hybrid_lact")
RouterFactory = Callable[[int, int], Router]
REMOTE_CODE_FILE = "nectar_remote.py"   # trust_remote_code entry point written beside every checkpoint
AUTO_MAP = {"AutoConfig": "nectar_remote.MoEGPT2Config", "AutoModelForCausalLM": "nectar_remote.MoEGPT2LMHeadModel"}
REMOTE_CODE = '''"""transformers' trust_remote_code entry point of a NECTAR MoE-DistilGPT2 checkpoint.

The classes come from the installed `nectar` package (the repository on PYTHONPATH, or
`pip install -e .` in it); nothing else is loaded from this directory.
"""

from nectar.models.gpt2_moe import MoEGPT2Config, MoEGPT2LMHeadModel  # noqa: F401
'''


class MoEGPT2Config(GPT2Config):
    """GPT2Config plus the MoE fields.

    moe_layers          block indices with an MoE MLP, or "all"
    expert_specs        [{kind, hidden, count}, ...]; default n_experts × gelu(n_inner or 4·n_embd)
    n_experts           used only when expert_specs is None
    router              "topk" | "capacity" | "topp"
    moe_top_k           k of topk / capacity routing
    capacity_factor     capacity routing: slots per expert = ceil(cf · N · k / E)
    moe_top_p           top-p routing threshold (max_k = moe_top_k_max or E)
    router_temperature  softmax temperature of the routers
    router_init_std     std of the freshly initialised gate weights
    router_selection_bias  per MoE layer, the trained router's selection bias [E] (auxiliary-loss-free
                        balancing), restored on load; None when every bias is zero
    attention_type      "gpt2" (GPT-2 attention) | "hybrid_lact" (nectar.lact.hybrid_attention, LaCT
                        Algorithm 2, in every block; it keeps no KV cache, so use_cache is False;
                        its lact_* settings are read from this config as extra attributes)
    """

    model_type = MODEL_TYPE

    def __init__(self, moe_layers: str | list[int] = "all", expert_specs: list[dict] | None = None,
                 n_experts: int = 8, router: str = "topk", moe_top_k: int = 2, capacity_factor: float = 1.25,
                 moe_top_p: float = 0.5, moe_top_k_max: int | None = None, router_temperature: float = 1.0,
                 router_init_std: float = DEFAULT_ROUTER_INIT_STD, attention_type: str = "gpt2",
                 router_selection_bias: list[list[float]] | None = None, **kwargs):
        self.moe_layers = list(moe_layers) if not isinstance(moe_layers, str) else moe_layers
        self.expert_specs = [dict(spec) for spec in expert_specs] if expert_specs is not None else None
        self.n_experts = n_experts
        self.router = router
        self.moe_top_k = moe_top_k
        self.capacity_factor = capacity_factor
        self.moe_top_p = moe_top_p
        self.moe_top_k_max = moe_top_k_max
        self.router_temperature = router_temperature
        self.router_init_std = router_init_std
        self.attention_type = attention_type
        self.router_selection_bias = ([list(map(float, row)) for row in router_selection_bias]
                                      if router_selection_bias is not None else None)
        super().__init__(**kwargs)
        self.validate_shape()
        self.validate_moe()
        if attention_type == "hybrid_lact":
            self.use_cache = False  # the hybrid layer recomputes the prefix instead of caching

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def moe_layer_indices(self) -> list[int]:
        """Sorted block indices that carry an MoE MLP."""
        if self.moe_layers == "all":
            return list(range(self.n_layer))
        if isinstance(self.moe_layers, str):
            raise ValueError(f'moe_layers must be "all" or a list of block indices, got {self.moe_layers!r}')
        indices = sorted(set(int(i) for i in self.moe_layers))
        if len(indices) != len(self.moe_layers) or any(not 0 <= i < self.n_layer for i in indices):
            raise ValueError(f"moe_layers must be distinct block indices in [0, {self.n_layer}), got {self.moe_layers}")
        return indices

    def resolved_expert_specs(self) -> list[ExpertSpec]:
        """ExpertSpecs of one MoE layer; FFN kinds without `hidden` get the dense inner width."""
        if self.expert_specs is None:
            return [ExpertSpec("gelu", self.inner_dim, self.n_experts)]
        specs = []
        for raw in self.expert_specs:
            unknown = set(raw) - {"kind", "hidden", "count"}
            if "kind" not in raw or unknown:
                raise ValueError(f"expert spec must be {{kind, hidden?, count?}}, got {raw!r}")
            hidden = raw.get("hidden")
            if hidden is None and raw["kind"] in ("gelu", "swiglu"):
                hidden = self.inner_dim
            specs.append(ExpertSpec(raw["kind"], hidden, raw.get("count", 1)))
        for spec in specs:
            spec.validate()
        return specs

    def num_experts(self) -> int:
        return sum(spec.count for spec in self.resolved_expert_specs())

    def router_kwargs(self) -> dict:
        """Keyword arguments of `make_router(self.router, E, **kwargs)`."""
        common = {"temperature": self.router_temperature}
        if self.router == "topk":
            return {"k": self.moe_top_k, **common}
        if self.router == "capacity":
            return {"k": self.moe_top_k, "capacity_factor": self.capacity_factor, **common}
        if self.router == "topp":
            return {"p": self.moe_top_p, "max_k": self.moe_top_k_max, **common}
        raise ValueError(f"unknown router {self.router!r}; choose one of {sorted(ROUTERS)}")

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """No-op: `save_pretrained` writes its own `auto_map` pointing at the installed package (see
        REMOTE_CODE); transformers' default would copy nectar/models/gpt2_moe.py into every checkpoint."""

    def validate_shape(self) -> None:
        """The GPT-2 fields a config.json could get wrong: positive sizes, heads dividing the width."""
        for name in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
            value = getattr(self, name, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int)
                                         or self.n_inner < 1):
            raise ValueError(f"config n_inner must be a positive integer or null, got {self.n_inner!r}")

    def validate_selection_bias(self) -> None:
        bias = self.router_selection_bias
        if bias is None:
            return
        layers, experts = len(self.moe_layer_indices()), self.num_experts()
        if len(bias) != layers or any(len(row) != experts for row in bias):
            raise ValueError(f"router_selection_bias must hold {layers} rows of {experts} values (MoE layers × "
                             f"experts), got {[len(row) for row in bias]}")
        if not all(math.isfinite(v) for row in bias for v in row):
            raise ValueError("router_selection_bias holds a non-finite value")

    def validate_moe(self) -> None:
        self.moe_layer_indices()
        experts = self.num_experts()
        if self.router in ("topk", "capacity") and not 1 <= self.moe_top_k <= experts:
            raise ValueError(f"moe_top_k must be in [1, {experts}] (the number of experts), got {self.moe_top_k}")
        self.router_kwargs()
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if not self.router_init_std >= 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std}")
        self.validate_selection_bias()


class MoEMLP(nn.Module):
    """Drop-in for GPT2MLP: hidden [B, T, D] -> dropout(MoELayer(hidden)) [B, T, D]."""

    def __init__(self, moe: MoELayer, resid_pdrop: float):
        super().__init__()
        self.moe = moe
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.moe(hidden_states))  # [B, T, D]


def build_expert_pool(config: MoEGPT2Config) -> ExpertPool:
    """The experts of one MoE layer in the stacked layout; GELU experts use the config's activation
    (as GPT2MLP does)."""
    return ExpertPool.from_specs(config.resolved_expert_specs(), config.n_embd, config.activation_function)


def build_moe_mlp(config: MoEGPT2Config) -> MoEMLP:
    experts = build_expert_pool(config)
    router = make_router(config.router, len(experts), **config.router_kwargs())
    return MoEMLP(MoELayer(config.n_embd, experts, router), config.resid_pdrop)


class MoEGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 LM with MoE MLPs in `config.moe_layers` (see the module docstring)."""

    config_class = MoEGPT2Config

    def __init__(self, config: MoEGPT2Config):
        if not isinstance(config, MoEGPT2Config):
            raise ValueError(f"MoEGPT2LMHeadModel needs a MoEGPT2Config, got {type(config).__name__}")
        super().__init__(config)
        for idx in config.moe_layer_indices():
            self.transformer.h[idx].mlp = build_moe_mlp(config)
        if config.attention_type == "hybrid_lact":
            for idx, block in enumerate(self.transformer.h):
                block.attn = HybridLaCTAttention(config, layer_idx=idx)
        self.post_init()  # initialises only the new (not yet initialised) modules, re-ties weights
        self._init_moe_weights()

    def forward(self, *args, **kwargs):
        """GPT2LMHeadModel.forward. When the caller passes no position ids, GPT-2 numbers the tokens
        itself and transformers' packed-sequence check, a host read (one GPU sync per forward), is
        answered without reading (`nectar.models.default_positions`; same logits)."""
        own_positions = len(args) <= 1 and kwargs.get("position_ids") is None  # at most input_ids by position
        with default_positions(own_positions):
            return super().forward(*args, **kwargs)

    forward.__signature__ = inspect.signature(GPT2LMHeadModel.forward)  # what transformers and callers inspect

    @torch.no_grad()
    def _init_moe_weights(self) -> None:
        """Small gates; expert weights as GPT-2 initialises its Conv1D / Linear layers (normal,
        std = initializer_range, zero biases) with the depth-scaled std for output projections."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for _, layer in self.moe_layers():
            nn.init.normal_(layer.gate.weight, std=self.config.router_init_std)
            for group in layer.experts.groups:
                if isinstance(group, GELUGroup):
                    nn.init.normal_(group.c_fc, std=std)
                    nn.init.normal_(group.c_proj, std=out_std)
                    nn.init.zeros_(group.c_fc_bias)
                    nn.init.zeros_(group.c_proj_bias)
                elif isinstance(group, SwiGLUGroup):
                    nn.init.normal_(group.gate_up, std=std)
                    nn.init.normal_(group.down, std=out_std)
                elif isinstance(group, ConstantGroup):
                    nn.init.normal_(group.mixer, std=std)

    # ----- loading and saving ------------------------------------------------------------------
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """No-op: see MoEGPT2Config.register_for_auto_class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained, strict: every tensor the config implies must come from the
        checkpoint and every checkpoint tensor must be used (ValueError otherwise; HF itself only
        logs, and the model would then run with random layers); routers are rebuilt from the config
        afterwards, so no router buffer is left uninitialised. A local checkpoint saved before the
        stacked expert layout (keys `...mlp.moe.experts.<i>.c_fc.weight`) loads too."""
        want_info = kwargs.pop("output_loading_info", False)
        legacy = legacy_expert_tensors(pretrained_model_name_or_path)
        with _transformers_errors_only() if legacy else nullcontext():  # it would report the old keys as unused
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                             **kwargs)
        model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
        check_loading_info(without_legacy_keys(info) if legacy else info, pretrained_model_name_or_path)
        if legacy:  # a checkpoint saved before the stacked expert layout: stack its expert tensors
            model.load_legacy_experts(legacy)
        model.reset_routers()
        return (model, info) if want_info else model

    def reset_routers(self) -> None:
        """Every MoE layer gets a fresh router of the config's kind, with the config's trained
        selection bias (zeros when none was saved)."""
        self.set_router_by_name(self.config.router, **self.config.router_kwargs())
        bias = self.config.router_selection_bias
        if bias is not None:
            with torch.no_grad():
                for (_, layer), row in zip(self.moe_layers(), bias):
                    layer.router.selection_bias.copy_(torch.tensor(row))

    def trained_selection_bias(self) -> list[list[float]] | None:
        """The selection bias of the config's router kind in every MoE layer (None when all zero or
        when a runtime policy router is installed: those are not part of the trained model)."""
        routers = [layer.router for _, layer in self.moe_layers()]
        if not routers or not all(type(r) in ROUTERS.values() for r in routers):
            return None
        rows = [r.selection_bias.detach().float().cpu().tolist() for r in routers]
        return rows if any(v != 0.0 for row in rows for v in row) else None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus the trained selection bias in the config and the
        trust_remote_code entry point (`auto_map` + nectar_remote.py)."""
        self.config.router_selection_bias = self.trained_selection_bias()
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)
        return result

    # ----- sparse upcycling -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: GPT2LMHeadModel, num_experts: int = 8, top_k: int = 2,
                   moe_layers: str | list[int] = "all", top_p: float | None = None,
                   **config_kwargs) -> "MoEGPT2LMHeadModel":
        """Upcycle a dense GPT-2 LM: copy all weights, each GELU expert = that block's MLP. `dense`
        is a transformers GPT2LMHeadModel, or this class without MoE layers (a dense model with
        hybrid LaCT attention, whose fast-weight parameters are copied too).

        `config_kwargs` go to MoEGPT2Config (router, capacity_factor, router_temperature,
        expert_specs, router_init_std...). Experts that are not GELU of the dense width keep
        their fresh initialisation (e.g. MoE++ zero/copy experts).
        """
        if not isinstance(dense, GPT2LMHeadModel) or (isinstance(dense, MoEGPT2LMHeadModel) and dense.moe_layers()):
            raise ValueError(f"from_dense needs a dense transformers.GPT2LMHeadModel, got {type(dense).__name__}")
        if top_p is not None:
            config_kwargs["moe_top_p"] = top_p
        base = {k: v for k, v in dense.config.to_dict().items()
                if k not in ("model_type", "architectures", "moe_layers", "expert_specs", "n_experts")}
        config = MoEGPT2Config(**{**base, "moe_layers": moe_layers, "n_experts": num_experts, "moe_top_k": top_k,
                                  **config_kwargs})
        parameter = next(dense.parameters())
        model = cls(config).to(device=parameter.device, dtype=parameter.dtype)
        model._copy_dense_weights(dense)
        model.train(dense.training)
        return model

    @torch.no_grad()
    def _copy_dense_weights(self, dense: GPT2LMHeadModel) -> None:
        moe_blocks = set(self.config.moe_layer_indices())
        dense_mlp_keys = {k for k in dense.state_dict() if _block_of(k) in moe_blocks and ".mlp." in k}
        state = {k: v for k, v in dense.state_dict().items() if k not in dense_mlp_keys}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._is_new_parameter(k, moe_blocks)]
        if missing or unexpected:
            raise ValueError(f"dense model does not match the MoE layout: missing {missing}, unexpected {unexpected}")
        for idx, layer in self.moe_layers():
            dense_mlp = dense.transformer.h[idx].mlp
            for group in layer.experts.groups:
                if isinstance(group, GELUGroup) and group.c_fc.shape[1:] == dense_mlp.c_fc.weight.shape:
                    for stacked, weight in ((group.c_fc, dense_mlp.c_fc.weight), (group.c_fc_bias, dense_mlp.c_fc.bias),
                                            (group.c_proj, dense_mlp.c_proj.weight),
                                            (group.c_proj_bias, dense_mlp.c_proj.bias)):
                        stacked.copy_(weight.unsqueeze(0).expand_as(stacked))  # every expert = the dense MLP
        self.tie_weights()

    @torch.no_grad()
    def load_legacy_experts(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load per-expert tensors of the old layout (full state-dict keys) into the expert groups."""
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint expert tensors do not match this model's experts: {unexpected[:4]}")
        pools = [f"transformer.h.{idx}.mlp.moe.experts.groups." for idx, _ in self.moe_layers()]
        unfilled = [k for k in missing if any(k.startswith(p) for p in pools)]
        if unfilled:
            raise ValueError(f"checkpoint lacks expert tensors for {unfilled[:4]}")

    def _is_new_parameter(self, key: str, moe_blocks: set[int]) -> bool:
        """Keys with no dense counterpart: MoE MLPs, and the LaCT extras of hybrid attention."""
        if _block_of(key) in moe_blocks and ".mlp.moe." in key:
            return True
        hybrid = self.config.attention_type == "hybrid_lact"
        return hybrid and ".attn." in key and not any(f".attn.{n}." in key for n in ("c_attn", "c_proj"))

    # ----- routing ----------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        """(block index, MoELayer) for every MoE block, in order."""
        return [(i, block.mlp.moe) for i, block in enumerate(self.transformer.h) if isinstance(block.mlp, MoEMLP)]

    def set_router(self, factory: RouterFactory) -> None:
        """Replace every MoE layer's router by `factory(block_idx, num_experts)`; gates untouched."""
        for idx, layer in self.moe_layers():
            router = factory(idx, layer.num_experts)
            if not isinstance(router, Router) or router.num_experts != layer.num_experts:
                raise ValueError(f"router factory returned {router!r} for block {idx}; need a Router over "
                                 f"{layer.num_experts} experts")
            layer.router = router.to(layer.gate.weight.device)

    def set_router_by_name(self, name: str, **kwargs) -> None:
        """set_router with `make_router(name, E, **kwargs)` ("topk", "capacity", "topp")."""
        self.set_router(lambda _idx, num_experts: make_router(name, num_experts, **kwargs))

    def routing_metrics(self) -> dict[int, MoEMetrics]:
        """Block index -> metrics of the last forward (ValueError before any forward)."""
        metrics = {idx: layer.last_metrics for idx, layer in self.moe_layers()}
        if any(m is None for m in metrics.values()):
            raise ValueError("routing_metrics needs a forward pass first")
        return metrics

    @contextmanager
    def recording(self, recorder: RoutingRecorder) -> Iterator[RoutingRecorder]:
        """Every MoE layer writes its routing into `recorder` while the block runs."""
        layers = [layer for _, layer in self.moe_layers()]
        for layer in layers:
            layer.recorder = recorder
        try:
            yield recorder
        finally:
            for layer in layers:
                layer.recorder = None

    def new_recorder(self, **options) -> RoutingRecorder:
        """A RoutingRecorder over this model's MoE layers (options: see RoutingRecorder)."""
        return RoutingRecorder([layer for _, layer in self.moe_layers()], **options)

    def chunk_workload(self, batch: int, seq_len: int, policy: str = "") -> ChunkWorkload:
        """The last forward as a ChunkWorkload; dense blocks appear as one GELU expert."""
        tokens = batch * seq_len
        metrics = self.routing_metrics()
        for idx, m in metrics.items():
            if m.num_tokens != tokens:
                raise ValueError(f"the last forward routed {m.num_tokens} tokens in block {idx}, "
                                 f"not batch*seq_len = {batch}*{seq_len} = {tokens}")
        counts = [metrics[i].tokens_per_expert for i, _ in self.moe_layers()]
        dropped = [metrics[i].dropped_tokens for i, _ in self.moe_layers()]
        return self.workload_from_counts(counts, batch, seq_len, policy, dropped)

    def workload_from_counts(self, counts: list[list[int]], batch: int, seq_len: int, policy: str = "",
                             dropped: list[int] | None = None) -> ChunkWorkload:
        """The ChunkWorkload of a chunk [batch, seq_len] whose MoE layers computed `counts` [L_moe][E]
        (token, slot) pairs; dense blocks appear as one GELU expert."""
        tokens, dtype_bytes = batch * seq_len, self.dtype.itemsize
        moe = {idx: layer for idx, layer in self.moe_layers()}
        if len(counts) != len(moe):
            raise ValueError(f"got counts for {len(counts)} MoE layers, the model has {len(moe)}")
        per_block = dict(zip(moe, zip(counts, dropped or [0] * len(counts))))
        layers = [moe[i].layer_workload(per_block[i][0], dtype_bytes, per_block[i][1]) if i in moe
                  else _dense_layer_workload(self.config, tokens, dtype_bytes) for i in range(self.config.n_layer)]
        return ChunkWorkload(tokens=tokens, batch=batch, seq_len=seq_len, d_model=self.config.n_embd,
                             n_layers=self.config.n_layer, n_heads=self.config.n_head,
                             vocab_size=self.config.vocab_size, layers=layers, dtype_bytes=dtype_bytes,
                             policy=policy)


LEGACY_EXPERT_KEY = re.compile(r"^transformer\.h\.\d+\.mlp\.moe\.experts\.\d+\.")


def legacy_expert_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Per-expert tensors of the old layout in a local checkpoint directory ({} if none or not local)."""
    directory = Path(path)
    if not directory.is_dir():
        return {}
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({k: handle.get_tensor(k) for k in handle.keys() if LEGACY_EXPERT_KEY.match(k)})
    elif (directory / "pytorch_model.bin").is_file():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: v for k, v in state.items() if LEGACY_EXPERT_KEY.match(k)}
    return tensors


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def without_legacy_keys(info: dict) -> dict:
    """The loading report once legacy per-expert tensors were stacked into the groups."""
    unexpected = [k for k in info.get("unexpected_keys", []) or [] if not LEGACY_EXPERT_KEY.match(str(k))]
    missing = [k for k in info.get("missing_keys", []) or [] if ".mlp.moe.experts.groups." not in str(k)]
    return {**info, "unexpected_keys": unexpected, "missing_keys": missing}


def check_loading_info(info: dict, source) -> None:
    """ValueError when transformers' loading report lists missing, unexpected or mis-shaped tensors."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint"), ("unexpected_keys", "not used by the config"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key, []) or [])
        if names:
            shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    if problems:
        raise ValueError(f"the weights in {str(source)!r} do not match its config.json ({'; '.join(problems)}); "
                         "was config.json edited, or the checkpoint written by another model?")


def _block_of(key: str) -> int | None:
    """Block index of a state-dict key `transformer.h.<i>....`, else None."""
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["transformer", "h"] else None


def _dense_layer_workload(config: GPT2Config, tokens: int, dtype_bytes: int) -> LayerWorkload:
    inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
    with torch.device("meta"):  # only the shapes are needed to price it
        cost = GELUExpert(config.n_embd, inner, config.activation_function).cost_per_token(dtype_bytes)
    return LayerWorkload(tokens_per_expert=[tokens], expert_costs=[cost])


AutoConfig.register(MODEL_TYPE, MoEGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(MoEGPT2Config, MoEGPT2LMHeadModel, exist_ok=True)


# ----- loading dense weights and presets ------------------------------------------------------
def load_dense_gpt2(path_or_name: str | os.PathLike, local_files_only: bool = True, **kwargs) -> GPT2LMHeadModel:
    """A GPT-2 / DistilGPT2 LM from a local directory or the HF cache (no download by default)."""
    try:
        return GPT2LMHeadModel.from_pretrained(str(path_or_name), local_files_only=local_files_only, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(
            f"GPT-2 weights {str(path_or_name)!r} not found locally (local_files_only={local_files_only}). "
            "Pass a directory holding config.json + model.safetensors (e.g. one written by save_pretrained), "
            "or put the model in the Hugging Face cache; this project never downloads weights."
        ) from exc


PRESETS: dict[str, dict] = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_inner=3072, n_positions=1024),
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, n_positions=256,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
MOE_PRESETS: dict[str, dict] = {
    "distilgpt2-moe": dict(base="distilgpt2", n_experts=8, moe_top_k=2),
    "tiny-moe": dict(base="tiny", n_experts=4, moe_top_k=2),
}


def dense_model(config: GPT2Config) -> GPT2LMHeadModel:
    """A dense LM of `config`: transformers' GPT-2, or — when the config asks for hybrid LaCT
    attention (`attention_type`) — this module's model with no MoE layer, so that the dense parent
    of a LaCT recipe trains its fast-weight memory too."""
    if getattr(config, "attention_type", "gpt2") == "gpt2":
        return GPT2LMHeadModel(config)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    return MoEGPT2LMHeadModel(MoEGPT2Config(**{**fields, "moe_layers": []}))


def preset_config(name: str, vocab_size: int = 8192, eos_token_id: int = 0, **overrides) -> GPT2Config:
    """Config of a named preset: "distilgpt2", "tiny" (dense GPT2Config) or "<name>-moe" (MoE)."""
    if name in PRESETS:
        fields = dict(PRESETS[name])
        config_cls = GPT2Config
    elif name in MOE_PRESETS:
        moe = dict(MOE_PRESETS[name])
        fields = {**PRESETS[moe.pop("base")], **moe}
        config_cls = MoEGPT2Config
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + sorted(MOE_PRESETS)}")
    fields.update(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    return config_cls(**{**fields, **overrides})
