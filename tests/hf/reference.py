"""Independent per-token references: a family's routing of one token written out by hand, the
keep rules written as loops, and a sparse block's output computed token by token from its weights."""

from __future__ import annotations

import math

import torch


def family_raw_scores(family: str, gate, logits_E: torch.Tensor) -> torch.Tensor:
    """[E] the raw gate values of one token: softmax probabilities (fp32) or sigmoid scores."""
    if family == "deepseek_v3":
        return torch.sigmoid(logits_E.float())
    return torch.softmax(logits_E.float(), dim=-1)


def family_gates(family: str, gate, raw_K: list[float], kept: list[bool]) -> list[float]:
    """The family's gates of one token's chosen slots over the kept ones (0 elsewhere), in Python."""
    kept_raw = [r if k else 0.0 for r, k in zip(raw_K, kept)]
    total = sum(kept_raw)
    if family == "deepseek_v3":
        scale = float(gate.routed_scaling_factor)
        # not a comparison: DeepSeek-V3's own guard against a zero total, reproduced as written
        return [scale * (r / (total + 1e-20) if gate.norm_topk_prob else r) for r in kept_raw]
    renorm = family == "mixtral" or bool(gate.norm_topk_prob)
    return [r / total if renorm else r for r in kept_raw]


def ranks_of(weights: list[float]) -> list[int]:
    order = sorted(range(len(weights)), key=lambda j: (-weights[j], j))
    ranks = [0] * len(weights)
    for r, j in enumerate(order):
        ranks[j] = r
    return ranks


def keep_threshold(weights: list[float], tau: float) -> list[bool]:
    ranks = ranks_of(weights)
    return [ranks[j] == 0 or weights[j] >= tau for j in range(len(weights))]


def keep_top_p(weights: list[float], p: float) -> list[bool]:
    ranks = ranks_of(weights)
    order = sorted(range(len(weights)), key=lambda j: ranks[j])
    kept, mass = [False] * len(weights), 0.0
    for j in order:
        if mass < p:
            kept[j] = True
        mass += weights[j]
    return kept


def _swiglu(act, gate_HD, up_HD, down_DH, x_D):
    return down_DH @ (act(gate_HD @ x_D) * (up_HD @ x_D))


def block_reference(block, x_ND: torch.Tensor, experts: list[list[int]], gates: list[list[float]]) -> torch.Tensor:
    """[N, D] Σ_slots gate · expert(x) + shared experts, token by token from the 3-D weights."""
    ex = block.experts
    hidden = ex.down_proj.shape[-1]
    out_ND = torch.zeros_like(x_ND)
    for t in range(x_ND.shape[0]):
        for e, g in zip(experts[t], gates[t]):
            if g == 0.0:
                continue
            gate_up = ex.gate_up_proj[e]                                   # [2H, D]
            y_D = _swiglu(ex.act_fn, gate_up[:hidden], gate_up[hidden:], ex.down_proj[e], x_ND[t])
            out_ND[t] += torch.tensor(g, dtype=torch.float64).to(x_ND.dtype) * y_D
        if hasattr(block, "shared_experts"):
            m = block.shared_experts
            out_ND[t] += _swiglu(m.act_fn, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, x_ND[t])
        if hasattr(block, "shared_expert"):
            m = block.shared_expert
            s = torch.sigmoid(block.shared_expert_gate.weight @ x_ND[t])
            out_ND[t] += s * _swiglu(m.act_fn, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, x_ND[t])
    return out_ND


def brute_force_objective(weights, experts, cost_E, lam: float, tau: float) -> float:
    """mean_t Σ_kept c + λ · mean_t (−log(Σ_kept w / Σ w)), one token at a time."""
    total_cost, total_kl = 0.0, 0.0
    for w_row, e_row in zip(weights.tolist(), experts.tolist()):
        kept = keep_threshold(w_row, tau)
        total_cost += sum(float(cost_E[e]) for e, k in zip(e_row, kept) if k)
        total_kl += max(0.0, -math.log(sum(w for w, k in zip(w_row, kept) if k) / sum(w_row)))
    n = len(weights)
    return total_cost / n + lam * total_kl / n
