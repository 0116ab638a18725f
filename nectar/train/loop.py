"""Training the project's models: the dense DistilGPT2-architecture LM, then its upcycled MoE.

Function API (also used by the GPU runner):
  prepare_data(...)                      corpus -> tokenizer + train / held-out token streams
  train_dense(model, train_ids, cfg)     AdamW + warmup/cosine schedule + grad clipping, tqdm bar
  upcycle_and_finetune(dense, ids, cfg)  `MoEGPT2LMHeadModel.from_dense` then `finetune_moe`: LM loss
                                         + a balancing loss (`--balance-loss`: switch, importance,
                                         kl_uniform, entropy) + router z-loss, optionally the
                                         auxiliary-loss-free bias step (`--aux-free-gamma`)
  evaluate_perplexity(model, ids, ...)   exp(mean next-token NLL) over held-out windows
Runs are deterministic for a seed on CPU (seeded init, seeded batch order, no dropout randomness
beyond torch's seeded generator). A `deadline` (time.monotonic() value) stops a loop early; the
result says so.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, get_cosine_schedule_with_warmup

from nectar.moe.balancing import (aux_free_bias_update, entropy_regularizer, importance_loss, kl_to_uniform,
                                  router_z_loss, switch_load_balancing_loss)
from nectar.train.corpus import load_corpus
from nectar.model import MoEGPT2LMHeadModel
from nectar.train.tokenizer import DEFAULT_VOCAB_SIZE, encode_documents, iter_batches, train_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int = 300
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"        # autocast dtype: float32 (none) or bfloat16
    seed: int = 0
    balance_coef: float = 1e-2    # load-balancing loss weight (MoE stage)
    balance_loss: str = "switch"  # which balancing loss: see BALANCE_LOSSES
    z_coef: float = 1e-3          # router z-loss weight (MoE stage)
    aux_free_gamma: float = 0.0   # > 0: DeepSeek-V3 auxiliary-loss-free bias step per training step
    skip_batches: int = 0         # start this many batches into the seeded stream (a later stage
                                  # continues where the previous one stopped instead of re-reading it)
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {sorted(BALANCE_LOSSES)}, got {self.balance_loss!r}")
        if not (self.aux_free_gamma >= 0 and math.isfinite(self.aux_free_gamma)):
            raise ValueError(f"aux_free_gamma must be a finite number >= 0, got {self.aux_free_gamma}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (float16 would need loss scaling), "
                             f"got {self.dtype!r}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.warmup_steps >= 0 and self.skip_batches >= 0):
            raise ValueError("lr and grad_clip must be > 0; warmup_steps and skip_batches >= 0")


@dataclass
class TrainResult:
    """What one stage did: per-step losses (LM part and total), time, whether it stopped early."""

    steps: int
    lm_losses: list[float] = field(default_factory=list)
    total_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        return self.lm_losses[-1] if self.lm_losses else float("nan")


@dataclass
class PreparedData:
    tokenizer: object
    train_ids: torch.Tensor    # [N_train] token stream
    heldout_ids: torch.Tensor  # [N_heldout]
    manifest: dict


def prepare_data(vocab_size: int = DEFAULT_VOCAB_SIZE, holdout_every: int = 20, corpus_dir=None,
                 tokenizer=None) -> PreparedData:
    """Load the verified corpus, train (or reuse) the tokenizer on its train split, encode both splits."""
    split = load_corpus(corpus_dir, holdout_every=holdout_every)
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(split.train, vocab_size=vocab_size)
    return PreparedData(tokenizer, encode_documents(tokenizer, split.train),
                        encode_documents(tokenizer, split.heldout), split.manifest)


# Balancing losses of the MoE stage, each a function of the layer's last routing decision.
BALANCE_LOSSES = {
    "switch": switch_load_balancing_loss,                               # Switch Transformer f·P
    "importance": lambda d: importance_loss(d.probs),                   # Shazeer et al. CV²
    "kl_uniform": lambda d: kl_to_uniform(d.probs),                     # KL(p̄ ‖ U)
    "entropy": lambda d: entropy_regularizer(d.probs, token_coef=1.0),  # −I(token; expert)
}


def moe_aux_loss(model: MoEGPT2LMHeadModel, balance_coef: float, z_coef: float,
                 balance_loss: str = "switch") -> torch.Tensor:
    """Mean over MoE layers of balance_coef·(balancing loss) + z_coef·z-loss, from the last forward."""
    balance = BALANCE_LOSSES[balance_loss]
    terms = []
    for _, layer in model.moe_layers():
        decision = layer.last_decision
        terms.append(balance_coef * balance(decision) + z_coef * router_z_loss(decision.logits.float()))
    return torch.stack(terms).mean()


@torch.no_grad()
def aux_free_step(model: MoEGPT2LMHeadModel, gamma: float) -> None:
    """One auxiliary-loss-free balancing step on every MoE layer's selection bias, from its last
    routing decision's loads (DeepSeek-V3)."""
    for _, layer in model.moe_layers():
        loads = layer.last_decision.tokens_per_expert()
        layer.router.selection_bias.copy_(aux_free_bias_update(layer.router.selection_bias, loads, gamma))


def _autocast(cfg: TrainConfig):
    device_type = torch.device(cfg.device).type
    enabled = cfg.dtype != "float32"
    return torch.autocast(device_type=device_type, dtype=DTYPES[cfg.dtype], enabled=enabled)


def train_lm(model: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig, aux_loss=None,
             deadline: float | None = None, desc: str = "train") -> TrainResult:
    """Generic next-token training loop; `aux_loss(model) -> scalar` is added when given."""
    cfg.validate()
    model.to(cfg.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    batches = itertools.islice(iter_batches(train_ids, cfg.batch, cfg.seq_len, seed=cfg.seed), cfg.skip_batches, None)
    result, start = TrainResult(steps=0), time.monotonic()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False)
    for _ in bar:
        if deadline is not None and time.monotonic() > deadline:
            result.stopped_early = True
            break
        input_ids = next(batches).to(cfg.device)  # [B, T]
        with _autocast(cfg):
            lm_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            total = lm_loss + aux_loss(model) if aux_loss is not None else lm_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        if cfg.aux_free_gamma > 0 and aux_loss is not None:
            aux_free_step(model, cfg.aux_free_gamma)
        result.steps += 1
        result.tokens += input_ids.numel()
        result.lm_losses.append(lm_loss.detach().item())
        result.total_losses.append(total.detach().item())
        bar.set_postfix(loss=f"{result.lm_losses[-1]:.3f}")
    result.seconds = time.monotonic() - start
    model.eval()
    return result


def train_dense(model: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                deadline: float | None = None) -> TrainResult:
    """Train a dense GPT-2 LM on the token stream (seeded)."""
    torch.manual_seed(cfg.seed)
    return train_lm(model, train_ids, cfg, deadline=deadline, desc="dense")


def upcycle_and_finetune(dense: GPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                         num_experts: int = 4, top_k: int = 2, moe_layers="all", deadline: float | None = None,
                         **moe_config) -> tuple[MoEGPT2LMHeadModel, TrainResult]:
    """Sparse-upcycle `dense` (see MoEGPT2LMHeadModel.from_dense) and fine-tune it with the
    Switch load-balancing loss and the router z-loss (weights cfg.balance_coef, cfg.z_coef)."""
    torch.manual_seed(cfg.seed)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                                        **moe_config)
    return moe, finetune_moe(moe, train_ids, cfg, deadline=deadline)


def finetune_moe(moe: MoEGPT2LMHeadModel, train_ids: torch.Tensor, cfg: TrainConfig,
                 deadline: float | None = None) -> TrainResult:
    """Train an MoE LM with LM loss + the mean over layers of the balancing and z losses."""
    aux = lambda model: moe_aux_loss(model, cfg.balance_coef, cfg.z_coef, cfg.balance_loss)  # noqa: E731
    return train_lm(moe, train_ids, cfg, aux_loss=aux, deadline=deadline, desc="moe")


@torch.no_grad()
def evaluate_perplexity(model: GPT2LMHeadModel, ids: torch.Tensor, seq_len: int = 128, batch: int = 16,
                        max_tokens: int | None = None, device: str | None = None) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of `ids` (tail dropped)."""
    if ids.dim() != 1 or ids.numel() < seq_len:
        raise ValueError(f"need a 1-D token stream of at least seq_len={seq_len} tokens, got shape {list(ids.shape)}")
    if max_tokens is not None:
        ids = ids[: max(seq_len, max_tokens)]
    device = device or next(model.parameters()).device
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)  # [S, T]
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        input_ids = windows[start:start + batch].to(device)                   # [b, T]
        logits = model(input_ids=input_ids, use_cache=False).logits.float()   # [b, T, V]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                input_ids[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(nll)
        count += input_ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll_sum / count)
