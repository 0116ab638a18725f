"""Training the project's models: the dense DistilGPT2-architecture LM, then its upcycled MoE.

Function API (the recipes, `nectar train` and the GPU campaign use it):
  prepare_data(...)                      corpus -> tokenizer + training stream + held-out streams
  train_lm(model, ids, cfg, aux_loss)    AdamW (decay on matrices only; the gates with their own lr
                                         scale) + warm-up/cosine schedule by steps or by time
                                         (nectar.train.schedule) + grad clipping + autocast; per-step
                                         losses read back every `log_every` steps only
  train_dense / upcycle_and_finetune / finetune_moe
                                         the two stages; the MoE stage adds `MoEAuxLoss`: a balancing
                                         loss (BALANCE_LOSSES, incl. the null-aware one), the router
                                         z-loss and the expected-compute regulariser, optionally the
                                         auxiliary-loss-free bias step (`aux_free_gamma`)
  evaluate_perplexity(model, ids, ...)   exp(mean next-token NLL) over held-out windows
Runs are deterministic for a seed on CPU with a step count (seeded init, seeded batch order, no
time-dependent schedule). A `deadline` (a time.monotonic() value) ends a stage; with a deadline the
schedule decays by time as well, so the stage still ends at the schedule's floor.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel

from nectar.models.gpt2_moe import MoEGPT2LMHeadModel
from nectar.moe.balancing import (aux_free_bias_update, entropy_regularizer, importance_loss, kl_to_uniform,
                                  router_z_loss, switch_load_balancing_loss)
from nectar.train.aux_losses import (COMPUTE_COSTS, compute_costs, expected_compute_loss, full_mask,
                                     null_aware_switch_loss, relative_costs)
from nectar.train.schedule import CosineSchedule, StageClock
from nectar.train.tokenizer import iter_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int | None = 300       # None: the stage runs until its deadline
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    warmup_share: float | None = None   # the warm-up also ends at this share of the stage (schedule.py)
    lr_floor: float = 0.1         # final lr / peak lr of the cosine decay
    weight_decay: float = 0.01    # on matrices (dim >= 2) only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"        # autocast dtype: float32 (none) or bfloat16
    seed: int = 0
    balance_coef: float = 1e-2    # load-balancing loss weight (MoE stage)
    balance_loss: str = "switch"  # which balancing loss: see BALANCE_LOSSES
    z_coef: float = 1e-3          # router z-loss weight (MoE stage)
    compute_coef: float = 0.0     # expected-compute regulariser weight (MoE stage)
    compute_costs: str = "flops"  # its per-expert costs: "flops" or "skip" (nectar.train.aux_losses)
    compute_temperature: float = 1.0  # its softmax temperature (< 1: mostly the first choice)
    router_lr_scale: float = 1.0  # the gates' lr = lr * this (MoE stage)
    aux_free_gamma: float = 0.0   # > 0: DeepSeek-V3 auxiliary-loss-free bias step per training step
    skip_batches: int = 0         # start this many batches into the seeded stream (a later stage
                                  # continues where the previous one stopped instead of re-reading it)
    log_every: int = 20           # read losses back to the host every this many steps
    compile: bool = False         # torch.compile the model (falls back to eager if that fails)
    progress: bool = True

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("batch", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {sorted(BALANCE_LOSSES)}, got {self.balance_loss!r}")
        for name in ("aux_free_gamma", "compute_coef", "balance_coef", "z_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.compute_costs not in COMPUTE_COSTS or not self.compute_temperature > 0:
            raise ValueError(f"compute_costs must be one of {COMPUTE_COSTS} and compute_temperature > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (float16 would need loss scaling), "
                             f"got {self.dtype!r}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.warmup_steps >= 0 and self.skip_batches >= 0
                and self.router_lr_scale > 0 and 0 <= self.lr_floor <= 1):
            raise ValueError("lr, grad_clip and router_lr_scale must be > 0; warmup_steps and skip_batches >= 0; "
                             "lr_floor in [0, 1]")


@dataclass
class TrainResult:
    """What one stage did: per-step losses (LM part and total), time, whether it stopped early."""

    steps: int
    lm_losses: list[float] = field(default_factory=list)
    total_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False   # the deadline came before the step count
    compiled: bool = False

    @property
    def final_loss(self) -> float:
        return self.lm_losses[-1] if self.lm_losses else float("nan")


def prepare_data(*args, **kwargs):
    """The training data of a recipe: `nectar.train.data.load_training_data` (the one place the
    recipes load data through, so that callers and tests can intercept it here)."""
    from nectar.train.data import load_training_data

    return load_training_data(*args, **kwargs)


# Balancing losses of the MoE stage: f(decision, full_E [E] bool) -> scalar.
BALANCE_LOSSES: dict[str, Callable] = {
    "switch": lambda d, full: switch_load_balancing_loss(d),                 # Switch Transformer f·P
    "importance": lambda d, full: importance_loss(d.probs),                  # Shazeer et al. CV²
    "kl_uniform": lambda d, full: kl_to_uniform(d.probs),                    # KL(p̄ ‖ U)
    "entropy": lambda d, full: entropy_regularizer(d.probs, token_coef=1.0),  # −I(token; expert)
    "null_aware": null_aware_switch_loss,                                    # AdaMoE: Switch over full experts
}


class MoEAuxLoss:
    """Mean over MoE layers of balance_coef·balancing + z_coef·z-loss + compute_coef·expected compute,
    from each layer's last routing decision (per-layer expert costs computed once)."""

    def __init__(self, model: MoEGPT2LMHeadModel, balance_coef: float, z_coef: float, balance_loss: str = "switch",
                 compute_coef: float = 0.0, compute_costs_kind: str = "flops", compute_temperature: float = 1.0):
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {sorted(BALANCE_LOSSES)}, got {balance_loss!r}")
        self.balance = BALANCE_LOSSES[balance_loss]
        self.balance_coef, self.z_coef, self.compute_coef = balance_coef, z_coef, compute_coef
        self.temperature = compute_temperature
        layers = [layer for _, layer in model.moe_layers()]
        self.full = [full_mask(relative_costs(layer)) for layer in layers]            # [E] per layer
        self.costs = [compute_costs(layer, compute_costs_kind) for layer in layers]   # [E] per layer

    def __call__(self, model: MoEGPT2LMHeadModel) -> torch.Tensor:
        terms = []
        for i, (_, layer) in enumerate(model.moe_layers()):
            decision = layer.last_decision
            if self.costs[i].device != decision.probs.device:
                self.costs[i], self.full[i] = self.costs[i].to(decision.probs.device), self.full[i].to(decision.probs.device)
            term = self.balance_coef * self.balance(decision, self.full[i]) \
                + self.z_coef * router_z_loss(decision.logits.float())
            if self.compute_coef:
                term = term + self.compute_coef * expected_compute_loss(decision, self.costs[i], self.temperature)
            terms.append(term)
        return torch.stack(terms).mean()


def moe_aux_loss(model: MoEGPT2LMHeadModel, balance_coef: float, z_coef: float, balance_loss: str = "switch",
                 compute_coef: float = 0.0) -> torch.Tensor:
    """`MoEAuxLoss` of the model's last forward (one-off form)."""
    return MoEAuxLoss(model, balance_coef, z_coef, balance_loss, compute_coef)(model)


@torch.no_grad()
def aux_free_step(model: MoEGPT2LMHeadModel, gamma: float) -> None:
    """One auxiliary-loss-free balancing step on every MoE layer's selection bias, from its last
    routing decision's loads (DeepSeek-V3)."""
    for _, layer in model.moe_layers():
        loads = layer.last_decision.tokens_per_expert()
        layer.router.selection_bias.copy_(aux_free_bias_update(layer.router.selection_bias, loads, gamma))


def autocast(device: str, dtype: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: weight decay on matrices except the gates; the gates at lr · router_lr_scale."""
    groups: dict[str, list] = {"decay": [], "no_decay": [], "gate": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "gate" if ".mlp.moe.gate." in name else "decay" if param.dim() >= 2 else "no_decay"
        groups[key].append(param)
    spec = [{"params": groups["decay"], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
            {"params": groups["no_decay"], "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": groups["gate"], "weight_decay": 0.0, "lr_scale": cfg.router_lr_scale}]
    fused = torch.device(cfg.device).type == "cuda"
    return torch.optim.AdamW([g for g in spec if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def maybe_compile(model: torch.nn.Module, enabled: bool):
    """torch.compile(model) when enabled (the first call shows whether it works)."""
    return torch.compile(model) if enabled else model


def train_lm(model: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig, aux_loss=None,
             deadline: float | None = None, desc: str = "train") -> TrainResult:
    """Next-token training until the step count or the deadline; `aux_loss(model) -> scalar` is added."""
    cfg.validate()
    model.to(cfg.device).train()
    clock = StageClock(cfg.steps, deadline)
    optimizer = make_optimizer(model, cfg)
    schedule = CosineSchedule(min(cfg.warmup_steps, cfg.steps or cfg.warmup_steps), cfg.lr_floor, cfg.warmup_share)
    batches = iter_batches(train_ids, cfg.batch, cfg.seq_len, seed=cfg.seed, skip=cfg.skip_batches)
    forward = maybe_compile(model, cfg.compile)
    result, pending = TrainResult(steps=0, compiled=cfg.compile), []
    bar = tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, leave=False)
    while True:
        progress = clock.progress(result.steps)
        if progress >= 1.0:
            result.stopped_early = clock.time_limited(result.steps) and cfg.steps is not None
            break
        factor = schedule.factor(result.steps, progress)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor
        input_ids = next(batches).to(cfg.device, non_blocking=True)  # [B, T]
        lm_loss, total, forward = _step(model, forward, input_ids, cfg, aux_loss, optimizer)
        result.steps += 1
        result.tokens += input_ids.numel()
        result.lrs.append(cfg.lr * factor)
        pending.append(torch.stack([lm_loss.detach().float(), total.detach().float()]))
        if result.steps % cfg.log_every == 0:
            _flush(pending, result, bar)
    _flush(pending, result, bar)
    bar.close()
    result.compiled = forward is not model
    result.seconds = time.monotonic() - clock.start
    model.eval()
    return result


def _step(model, forward, input_ids, cfg: TrainConfig, aux_loss, optimizer):
    """One optimisation step; a torch.compile failure on the first call falls back to eager."""
    try:
        with autocast(cfg.device, cfg.dtype):
            lm_loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    except Exception as exc:  # noqa: BLE001  torch.compile raises many error types (backend, graph breaks)
        if forward is model:
            raise
        print(f"nectar train: torch.compile failed ({str(exc).splitlines()[0][:200]}); continuing eager",
              file=sys.stderr, flush=True)
        forward = model
        with autocast(cfg.device, cfg.dtype):
            lm_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    with autocast(cfg.device, cfg.dtype):
        total = lm_loss + aux_loss(model) if aux_loss is not None else lm_loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if cfg.aux_free_gamma > 0 and aux_loss is not None:
        aux_free_step(model, cfg.aux_free_gamma)
    return lm_loss, total, forward


def _flush(pending: list, result: TrainResult, bar) -> None:
    """Read the pending losses back (one host sync); stop on a non-finite loss."""
    if not pending:
        return
    values = torch.stack(pending).tolist()  # [n, 2]
    pending.clear()
    for lm, total in values:
        result.lm_losses.append(lm)
        result.total_losses.append(total)
    if not all(math.isfinite(v) for row in values for v in row):
        raise RuntimeError(f"training diverged: a non-finite loss by step {result.steps}; lower the learning rate")
    bar.update(len(values))
    bar.set_postfix(loss=f"{result.lm_losses[-1]:.3f}")


def train_dense(model: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                deadline: float | None = None) -> TrainResult:
    """Train a dense GPT-2 LM on the token stream (seeded)."""
    torch.manual_seed(cfg.seed)
    return train_lm(model, train_ids, cfg, deadline=deadline, desc="dense")


def upcycle_and_finetune(dense: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                         num_experts: int = 4, top_k: int = 2, moe_layers="all", deadline: float | None = None,
                         **moe_config) -> tuple[MoEGPT2LMHeadModel, TrainResult]:
    """Sparse-upcycle `dense` (see MoEGPT2LMHeadModel.from_dense) and fine-tune it (`finetune_moe`)."""
    torch.manual_seed(cfg.seed)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                                        **moe_config)
    return moe, finetune_moe(moe, train_ids, cfg, deadline=deadline)


def finetune_moe(moe: MoEGPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                 deadline: float | None = None) -> TrainResult:
    """Train an MoE LM with LM loss + `MoEAuxLoss` (cfg's balancing, z and compute weights)."""
    aux = MoEAuxLoss(moe, cfg.balance_coef, cfg.z_coef, cfg.balance_loss, cfg.compute_coef, cfg.compute_costs,
                     cfg.compute_temperature)
    return train_lm(moe, train_ids, cfg, aux_loss=aux, deadline=deadline, desc="moe")


@torch.no_grad()
def evaluate_perplexity(model: GPT2LMHeadModel, ids: torch.Tensor, seq_len: int = 128, batch: int = 16,
                        max_tokens: int | None = None, device: str | None = None, dtype: str = "float32",
                        positions: tuple[int, int] | None = None) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of `ids` (tail dropped);
    `positions` (lo, hi): only the predictions of the tokens at positions lo..hi−1 of each window
    (lo ≥ 1: position 0 is never predicted), e.g. (512, 1024) for the second half of 1024."""
    lo, hi = positions if positions is not None else (1, seq_len)
    if not 1 <= lo < hi <= seq_len:
        raise ValueError(f"positions must satisfy 1 <= lo < hi <= seq_len={seq_len}, got {positions}")
    if ids.dim() != 1 or ids.numel() < seq_len:
        raise ValueError(f"need a 1-D token stream of at least seq_len={seq_len} tokens, got shape {list(ids.shape)}")
    if max_tokens is not None:
        ids = ids[: max(seq_len, max_tokens)]
    device = device or next(model.parameters()).device
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)  # [S, T]
    was_training = model.training
    model.eval()
    nll_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, windows.shape[0], batch):
        input_ids = windows[start:start + batch].to(device)                   # [b, T]
        with autocast(str(device), dtype):
            logits = model(input_ids=input_ids, use_cache=False).logits        # [b, T, V]
        nll = torch.nn.functional.cross_entropy(logits[:, lo - 1:hi - 1].float().reshape(-1, logits.shape[-1]),
                                                input_ids[:, lo:hi].reshape(-1), reduction="sum")
        nll_sum += nll.double()
        count += input_ids[:, lo:hi].numel()
    model.train(was_training)
    return math.exp(float(nll_sum) / count)
