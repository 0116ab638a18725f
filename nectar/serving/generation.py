"""`generate()` with NECTAR adapting: the serving controller inside transformers' own generation loop.

    from nectar.hf import attach
    from nectar.serving.generation import adaptive_generation

    attached = attach(model)                            # a supported transformers MoE (or MoE-DistilGPT2 as is)
    with adaptive_generation(attached) as session:      # NECTAR's serving routers + the serving controller
        tokens = attached.generate(ids, max_new_tokens=64, do_sample=False)
    session.summary()                                   # the price per window, the checked quality gap

Inside the block every MoE block routes with the `nectar` serving router (`batch-price` at the
controller's price: a token keeps its top-1 and a further expert the batch does not read yet only
when its weight pays the expert's share of the weight read; `nectar.serving.policies`), and the
model's forward is wrapped. A forward that adds one position per row to a cache that already holds
positions is a decode step. Every `check_every`-th decode step first runs a shadow forward of the
same inputs with static routing (the model's trained top-k); the cache positions the shadow wrote
are cropped off before the step itself runs, so what is generated is the policy's own sequence.

generate() has no reference continuation, so a checked step's quality gap is the expected NLL gap
under the static model's own next-token distribution, Σ_rows KL(p_static ‖ p_policy) — the
teacher-forced gap `nectar serve` measures when the references are what the static model would
write. The controller is `nectar serve`'s (`ServingController`: the same budgeted price control on the
same bound, one host read per window of decode steps). Leaving the block restores the model's routers and
forward, also after an error.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nectar.experiment.forward import install
from nectar.serving.controller import ServingController, ServingControllerConfig, vocab_kl_R
from nectar.serving.frontier import model_top_k, routers_for


@dataclass
class GenerationSession:
    """What `adaptive_generation` yields: the controller and the decode steps it saw."""

    controller: ServingController
    decode_steps: int = 0
    checks: int = 0

    def summary(self) -> dict:
        return {"decode_steps": self.decode_steps, "checks": self.checks, **self.controller.summary()}


def next_token_kl(static_logits_BV: torch.Tensor, policy_logits_BV: torch.Tensor) -> torch.Tensor:
    """Σ_rows KL(p_static ‖ p_policy) of two next-token logits [B, V] (a 0-d fp32 device tensor)."""
    return vocab_kl_R(torch.log_softmax(static_logits_BV.float(), dim=-1),
                      torch.log_softmax(policy_logits_BV.float(), dim=-1)).sum()


def _cache_of(kwargs: dict):
    """The generation cache a forward was given (transformers ≥ 5.25 calls it `cache`)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return cache if hasattr(cache, "get_seq_length") and hasattr(cache, "crop") else None


def _is_decode_step(args: tuple, kwargs: dict, cache) -> bool:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return cache is not None and ids is not None and ids.dim() == 2 and ids.shape[1] == 1 and cache.get_seq_length() > 0


def _wrapped_forward(forward, model, session: GenerationSession, static: list):
    """The model's forward with the controller's ride-along check on every check_every-th decode step."""
    controller = session.controller

    def step(*args, **kwargs):
        cache = _cache_of(kwargs)
        if not _is_decode_step(args, kwargs, cache):
            return forward(*args, **kwargs)
        controller.start_metering()
        checked = controller.check_due()
        if checked:
            length = cache.get_seq_length()
            install(model, static)
            try:
                shadow = forward(*args, **kwargs)
            finally:
                added = cache.get_seq_length() - length
                if added:
                    cache.crop(-added)                   # the shadow's positions leave the cache
                install(model, controller.routers)
        before = controller.totals_now() if checked else None
        out = forward(*args, **kwargs)
        if checked:
            logits_BV = out.logits[:, -1]
            rows = logits_BV.shape[0]
            controller.add_gap(next_token_kl(shadow.logits[:, -1], logits_BV), rows, controller.mass_since(before, rows))
            session.checks += 1
        session.decode_steps += 1
        controller.after_decode()
        return out
    return step


@contextmanager
def adaptive_generation(model, config: ServingControllerConfig | None = None):
    """Route `model` (anything `nectar serve` serves: MoE-DistilGPT2 or an attached transformers MoE)
    with NECTAR's serving routers and its controller for the block; yields a `GenerationSession`."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("adaptive_generation needs a model with MoE layers (nectar.hf.attach a supported family)")
    target = getattr(model, "hf", model)              # the module generate() calls
    before = [layer.router for _, layer in layers]
    routers = routers_for(model, "nectar")
    static = routers_for(model, f"static-top{model_top_k(model, layers[0][1])}")
    install(model, routers)
    session = GenerationSession(ServingController(routers, static, config or ServingControllerConfig()))
    had_own = "forward" in target.__dict__
    own = target.__dict__.get("forward")
    target.forward = _wrapped_forward(target.forward, model, session, static)
    try:
        yield session
    finally:
        if had_own:
            target.forward = own
        else:
            del target.forward
        install(model, before)
