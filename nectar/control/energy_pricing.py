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

import torch

from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig, kkt_bias
from nectar.control.priced import PriceStep, PriceTable, StepConfig
from nectar.control.routing_proxy import allowed_distribution, dropped_mass_kl
from nectar.moe.router import gate_probs


def priced_adaptation(router, c: torch.Tensor, lam: float, mu=None, nu: float = 0.0) -> dict:
    """adapt(...) keywords that put NECTAR's router where the chunk problem at price λ puts it:
    the KKT bias −(c + μ + νc)/λ and, for a router that may drop, the drop scale c/λ."""
    return {"bias": kkt_bias(c, lam, mu, nu).float(), "drop_scale": (c / lam).float() if router.drop else None}


def new_optimizer(router, config: StepConfig, lam: float) -> BiasOptimizer:
    return BiasOptimizer(router.num_experts, BiasOptimizerConfig(lam=lam, lr=config.lr, momentum=config.momentum,
                                                                 mode=config.mode))


def energy_price_table(router, logits: torch.Tensor, cost: torch.Tensor, lams: torch.Tensor,
                       mu=None, nu: float = 0.0) -> PriceTable:
    """The router's routing at every price of `lams` [G] on the gate logits [n, E] (module docstring)."""
    logits = logits.float()
    lams = lams.to(torch.float64)
    c = cost.to(torch.float64).cpu()
    if logits.shape[0] == 0:
        zeros = torch.zeros_like(lams)
        return PriceTable(lams, zeros, zeros.clone())
    logits = logits.cpu()
    allowed_NE = router.second_slot_mask(logits)                                  # [n, E] 0 or -inf
    m = int(torch.isfinite(allowed_NE).sum(-1).max())
    idx_nm = (allowed_NE + logits).topk(m, dim=-1).indices                        # [n, m] the candidates
    valid_nm = torch.isfinite(allowed_NE.gather(-1, idx_nm))
    q_nm = allowed_distribution(router, logits).gather(-1, idx_nm)                # [n, m]
    log_q = torch.log(q_nm.clamp_min(1e-30))
    bias_GE = torch.stack([kkt_bias(c, float(lam), mu, nu) for lam in lams]).float()   # [G, E]
    bias_Gnm = bias_GE[:, idx_nm]                                                 # [G, n, m]
    log_p = torch.log_softmax(log_q + bias_Gnm, dim=-1)
    kl_Gn = (log_p.exp() * (log_p - log_q)).where(valid_nm, torch.zeros(())).sum(-1)
    deviation = kl_Gn.double().mean(-1)                                           # [G]
    score_Gnm = (logits / router.temperature).gather(-1, idx_nm) + bias_Gnm
    score_Gnm = score_Gnm.masked_fill(~valid_nm, float("-inf"))
    rest_Gnx = idx_nm[None].expand_as(score_Gnm).gather(-1, score_Gnm.topk(router.extra_slots, dim=-1).indices)
    top1_n = logits.argmax(-1)
    cost_Gn = c[top1_n].expand(len(lams), -1) + c[rest_Gnx].sum(-1)
    if router.drop:
        dropped_Gn, drop_kl_Gn = _drops(router, logits, top1_n, rest_Gnx[..., 0], c, lams)
        deviation = deviation + (drop_kl_Gn * dropped_Gn).double().mean(-1)
        cost_Gn = cost_Gn - c[rest_Gnx[..., 0]] * dropped_Gn
    return PriceTable(lams, cost_Gn.mean(-1), deviation)


def _drops(router, logits: torch.Tensor, top1_n: torch.Tensor, second_Gn: torch.Tensor, c: torch.Tensor,
           lams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, n] slot 2 dropped at each price, [G, n] its KL −log(1 − w)): the router's drop rule
    −log(1 − w) < c[e]/λ with the drop scale the chunk problem sets."""
    probs = gate_probs(logits, router.temperature)                               # [n, E]
    experts_Gn2 = torch.stack([top1_n.expand_as(second_Gn), second_Gn], dim=-1)  # [G, n, 2]
    kl_Gn = dropped_mass_kl(probs.expand(len(lams), -1, -1), experts_Gn2)
    scale_GE = (c[None] / lams[:, None]).float()                                  # [G, E]
    return kl_Gn < scale_GE.gather(-1, second_Gn), kl_Gn


def bias_step(router, optimizer: BiasOptimizer, config: StepConfig, step: PriceStep) -> dict:
    """The layer's step on the chunk problem at step.lam; returns the instance it solved."""
    optimizer.config.lam = step.lam
    q = allowed_distribution(router, step.logits).double().cpu()                # [n, E] second-slot candidates
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
