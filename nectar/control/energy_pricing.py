"""NECTAR's energy-aware router at a price: its price table, its step and its start.

The chunk problem at price λ puts the router at the KKT bias b = −(c + μ + νc)/λ over the
second-slot candidates and, for a router that may drop, the drop scale c/λ (`priced_adaptation`).
`price_table` evaluates that routing at every λ of a grid in one vectorised pass over the sample's
candidate slots (at most a few per token for the default candidate set), exactly as the router's
forward and `routing_proxy.deviation_kl` would at each price one by one:

    deviation(λ) = mean_t KL(p_t(λ) ‖ q_t)  +  mean_t [slot 2 dropped at λ] · (−log(1 − w_t))
    mean_cost(λ) = mean_t ( c[top-1] + Σ_{remaining slots kept at λ} c[e] )

with q_t the static softmax restricted to the candidates, p_t(λ) = softmax(log q_t + b(λ)), the
remaining slots the best candidates by logits/τ + b(λ), and w_t slot 2's share of the two static
gates. `bias_step` is the controller's per-chunk step (`BiasOptimizer` on the chunk's candidates,
then the optional fast-weight network and its mixing coefficient α).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig, kkt_bias
from nectar.control.priced import PriceStep, PriceTable, StepConfig
from nectar.control.routing_proxy import allowed_distribution
from nectar.moe.router import gate_probs


def priced_adaptation(router, c: torch.Tensor, lam: float, mu=None, nu: float = 0.0) -> dict:
    """adapt(...) keywords that put NECTAR's router where the chunk problem at price λ puts it:
    the KKT bias −(c + μ + νc)/λ and, for a router that may drop, the drop scale c/λ."""
    return {"bias": kkt_bias(c, lam, mu, nu).float(), "drop_scale": (c / lam).float() if router.drop else None}


def new_optimizer(router, config: StepConfig, lam: float) -> BiasOptimizer:
    return BiasOptimizer(router.num_experts, BiasOptimizerConfig(lam=lam, lr=config.lr, momentum=config.momentum,
                                                                 mode=config.mode))


@dataclass
class Candidates:
    """One layer's sample of a chunk as the chunk problem sees it (built once, shared by the price
    table, the deviation and the step).

    logits  [n, E] float32 gate logits          q_nE  [n, E] static second-slot distribution
    idx     [m, n] the candidates of each token  valid [m, n, 1] real candidates (not padding)
    q       [m, n, 1] float64 q at the candidates
    """

    logits: torch.Tensor
    q_nE: torch.Tensor
    idx: torch.Tensor
    valid: torch.Tensor
    q: torch.Tensor
    source: torch.Tensor | None = None   # the tensor it was built from (a cache key by identity)

    @classmethod
    def of(cls, router, logits: torch.Tensor) -> "Candidates":
        logits = logits.float().cpu()
        allowed_NE = router.second_slot_mask(logits)                              # [n, E] 0 or -inf
        m = int(torch.isfinite(allowed_NE).sum(-1).max()) if logits.shape[0] else 1
        idx_mn = (allowed_NE + logits).topk(m, dim=-1).indices.T.contiguous()    # [m, n]
        valid = torch.isfinite(allowed_NE.T.gather(0, idx_mn))[..., None]
        q_nE = allowed_distribution(router, logits)
        return cls(logits, q_nE, idx_mn, valid, q_nE.T.gather(0, idx_mn).double()[..., None] * valid)


def energy_price_table(router, seen: Candidates, cost: torch.Tensor, lams: torch.Tensor,
                       mu=None, nu: float = 0.0) -> PriceTable:
    """The router's routing at every price of `lams` [G] on a chunk's candidates (module docstring)."""
    lams = lams.to(torch.float64)
    c = cost.to(torch.float64).cpu()
    mu_E = torch.zeros_like(c) if mu is None else torch.as_tensor(mu, dtype=torch.float64).cpu()
    bias_EG = -(c + mu_E + float(nu) * c)[:, None] / lams[None]                  # [E, G] the KKT bias
    scale_EG = (c[:, None] / lams[None]).float() if router.drop else None        # [E, G] the drop scale
    cost_G, deviation_G = routing_stats(router, seen, c, bias_EG, scale_EG)
    return PriceTable(lams, cost_G, deviation_G)


def routing_stats(router, seen: Candidates, c: torch.Tensor, bias_EG: torch.Tensor,
                  scale_EG: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """([G] mean cost per token, [G] mean KL to static) of the routing with bias bias_EG[:, g] and
    drop scale scale_EG[:, g] (None: no drop) on the candidates, for every column g.

    Over a token's m candidates, with w = q·e^b and Z = Σ w, the soft routing's KL to q is
    KL = Σ (w/Z)·b − log Z (b shifted per token so that its largest candidate entry is 0: the
    shift cancels and nothing underflows). Tensors are [m, n, G] in float64: the sums over the
    few candidates run over whole [n, G] planes."""
    n_cols = bias_EG.shape[1]
    if seen.logits.shape[0] == 0:
        zeros = torch.zeros(n_cols, dtype=torch.float64)
        return zeros, zeros.clone()
    valid = seen.valid
    bias_mnG = bias_EG.to(torch.float64).contiguous()[seen.idx]                   # [m, n, G]
    shifted = (bias_mnG - bias_mnG.masked_fill(~valid, float("-inf")).amax(0)).masked_fill(~valid, 0.0)
    w_mnG = seen.q * shifted.exp()
    z_nG = w_mnG.sum(0)
    deviation = ((w_mnG * shifted).sum(0) / z_nG - z_nG.log()).mean(0)           # [G]
    score_mnG = (seen.logits / router.temperature).T.gather(0, seen.idx).double()[..., None] + bias_mnG
    score_mnG = score_mnG.masked_fill(~valid, float("-inf"))
    best_xnG = score_mnG.topk(router.extra_slots, dim=0).indices if router.extra_slots > 1 \
        else _argmax_first(score_mnG)[None]                                      # [extra, n, G]
    rest_xnG = seen.idx[:, :, None].expand_as(score_mnG).gather(0, best_xnG)     # the remaining slots' experts
    top1_n = seen.logits.argmax(-1)
    cost_nG = c[top1_n][:, None] + c[rest_xnG].sum(0)
    if scale_EG is not None:
        dropped_nG, drop_kl_nG = _drops(router, seen.logits, top1_n, rest_xnG[0], scale_EG)
        deviation = deviation + (drop_kl_nG * dropped_nG).mean(0)
        cost_nG = cost_nG - c[rest_xnG[0]] * dropped_nG
    return cost_nG.mean(0), deviation


def _argmax_first(x_mnG: torch.Tensor) -> torch.Tensor:
    """[n, G] long: argmax over the few rows of dim 0 (the first on ties, as torch.argmax), by
    running comparisons of whole planes (a strided argmax over a short dim is slow on the CPU)."""
    best_val, best_idx = x_mnG[0], torch.zeros(x_mnG.shape[1:], dtype=torch.long)
    for j in range(1, x_mnG.shape[0]):
        better = x_mnG[j] > best_val
        best_val = torch.where(better, x_mnG[j], best_val)
        best_idx = best_idx.masked_fill(better, j)
    return best_idx


def _drops(router, logits: torch.Tensor, top1_n: torch.Tensor, second_nG: torch.Tensor,
           scale_EG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, G] slot 2 dropped at each price, [n, G] its KL −log(1 − w)): the router's drop rule
    −log(1 − w) < d[e] with drop scales d = scale_EG[:, g] (float32, as the router)."""
    probs_nE = gate_probs(logits, router.temperature)                            # [n, E]
    q1_n1 = probs_nE.gather(-1, top1_n[:, None])
    q2_nG = probs_nE.gather(-1, second_nG)
    share_nG = q2_nG / (q1_n1 + q2_nG).clamp_min(1e-30)
    kl_nG = -torch.log1p(-share_nG.clamp(max=1 - 1e-7))
    scale_nG = scale_EG.gather(0, second_nG)
    return kl_nG < scale_nG, kl_nG.double()


def bias_step(router, optimizer: BiasOptimizer, config: StepConfig, step: PriceStep, seen: Candidates) -> dict:
    """The layer's step on the chunk problem at step.lam; returns the instance it solved."""
    optimizer.config.lam = step.lam
    q = seen.q_nE.double()                                                       # [n, E] second-slot candidates
    optimizer.step(q, step.cost)
    router.adapt(bias=optimizer.bias, fallback=step.fallback,
                 drop_scale=(step.cost / step.lam).float() if router.drop else None)
    if router.fast_net is not None and step.inputs.numel():
        fast_step(router, config, step)
    return {"q": q.numpy(), "c": step.cost.numpy(), "lam": step.lam, "bias_online": optimizer.bias.numpy(),
            "p_online": optimizer.routing_distribution(q).numpy()}


def fast_step(router, config: StepConfig, step: PriceStep) -> None:
    """One step of the fast-weight network and of α on the chunk objective of the observed tokens."""
    log_q = torch.log(allowed_distribution(router, step.logits).float().clamp_min(1e-30))   # [n, E]
    cost = step.cost.to(device=log_q.device, dtype=torch.float32)                             # [E]
    bias = router.bias.to(log_q.device)
    alpha = torch.tensor(router.alpha, requires_grad=True)
    lam = step.lam

    def chunk_loss(scores: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(log_q + bias + alpha * scores, dim=-1)                    # [n, E]
        p = log_p.exp()
        return (p @ cost + lam * (p * (log_p - log_q)).sum(-1)).mean()

    router.fast_net.step(chunk_loss, lr=config.fast_lr, momentum=config.fast_momentum,
                         use_muon=config.fast_muon, inputs=step.inputs.float())
    with torch.enable_grad():
        scores = router.fast_net(step.inputs.float()).detach()
        (grad,) = torch.autograd.grad(chunk_loss(scores), alpha)
    moved = router.alpha - config.alpha_lr * float(grad)
    router.adapt(alpha=min(1.0, max(config.alpha_min, moved)))
