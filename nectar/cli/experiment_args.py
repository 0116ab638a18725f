"""Options shared by the commands that run routing policies on a token stream (`run`, `frontier`):
the backend, the stream, the controller and its limits, and the simulator's pricing.

Each option has its help and default here once; `configs(args)` turns them into a `RunConfig`,
`backend_factory(args, cfg)` into a zero-argument backend factory (backends refuse options they
cannot honour), and `place_model` puts the model where the backend measures it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from nectar.control.controller import ControllerConfig
from nectar.control.limits import LimitConfig
from nectar.control.quality_guard import GuardConfig
from nectar.control.schedule import Schedule
from nectar.experiment.runner import RunConfig


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def schedule(text: str) -> Schedule:
    try:
        return Schedule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_stream_args(p: argparse.ArgumentParser, tokens: int = 65536) -> None:
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim", help="telemetry backend (default: sim)")
    p.add_argument("--tokens", type=positive_int, default=tokens,
                   help="stream tokens per policy, a multiple of --chunk-tokens (default: %(default)s)")
    p.add_argument("--chunk-tokens", type=positive_int, default=4096,
                   help="tokens per chunk: one controller step per chunk (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="forward a chunk in micro-batches of this many sequences (default: whole chunk)")
    p.add_argument("--seed", type=int, default=0, help="experiment seed: shadow sampling, mixtures (default: 0)")


def add_controller_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("controller and limits")
    g.add_argument("--max-ppl-increase", type=float, default=GuardConfig.max_ppl_increase,
                   help="quality bound: relative perplexity increase vs static routing (default: %(default)s = 1%%)")
    g.add_argument("--budget-use", type=float, default=GuardConfig.budget_use,
                   help="share of the quality bound NECTAR aims to spend (default: %(default)s)")
    g.add_argument("--price", type=float, default=GuardConfig.price_init,
                   help="initial price of quality μ; it then follows the budget (default: %(default)s)")
    g.add_argument("--shadow-share", type=float, default=ControllerConfig.shadow_share,
                   help="share of the stream's sequences re-run under static routing (default: 1/64)")
    g.add_argument("--temp-cap", type=float, default=None, help="hold the GPU below this temperature (°C)")
    g.add_argument("--power-budget", type=schedule, default=None,
                   help="hold mean power below this (W), or a schedule 'seconds:W,…' starting at 0")


def add_sim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulator")
    g.add_argument("--faults", default=None, help="fault injection, e.g. 'stale:0.1,nan:0.05,hot_ambient:45'")
    g.add_argument("--gpu", default=None, help="GPU preset, name or JSON path (default: h100_sxm)")
    g.add_argument("--price-as", default="auto",
                   help="price routing at this shape (auto = distilgpt2; none = as it ran; default: auto)")
    g.add_argument("--price-batch", type=positive_int, default=128,
                   help="sequences of 1024 tokens a stream chunk is priced as (default: 128 ≈ 0.25 s on an H100)")
    g.add_argument("--heat", type=schedule, default=None,
                   help="extra ambient °C over time, 'seconds:°C,…' (a co-tenant heating the GPU)")


def controller_config(args) -> ControllerConfig:
    limits = LimitConfig(temp_cap_C=args.temp_cap, power_budget=args.power_budget)
    guard = GuardConfig(max_ppl_increase=args.max_ppl_increase, budget_use=args.budget_use, price_init=args.price)
    return ControllerConfig(shadow_share=args.shadow_share, seed=args.seed, limits=limits, guard=guard)


def configs(args, policies: list[str], interleave: bool | None = None) -> RunConfig:
    return RunConfig(policies=policies, tokens=args.tokens, chunk_tokens=args.chunk_tokens, seq_len=args.seq_len,
                     seed=args.seed, micro_batch_rows=args.micro_batch, interleave=interleave,
                     controller=controller_config(args))


def backend_factory(args, cfg: RunConfig, **extra):
    """A zero-argument factory of the chosen backend with the shared options."""
    from nectar.plugins import make_backend

    options = dict(seed=args.seed, preset=args.gpu, faults=args.faults, price_as=args.price_as,
                   price_batch=args.price_batch, chunk_rows=cfg.chunk_tokens // cfg.seq_len, heat=args.heat, **extra)
    return lambda: make_backend(args.backend, **options)


def place_model(model, torch_device: str):
    """The model where the backend measures it: bf16 on a GPU, fp32 on the CPU."""
    import torch

    if torch_device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this backend measures a CUDA GPU, but torch sees none")
        return model.to(torch_device, torch.bfloat16)
    return model.to(torch_device, torch.float32)


def with_limits(cfg: RunConfig, temp_cap_C: float | None = None, power_budget: Schedule | None = None) -> RunConfig:
    limits = replace(cfg.controller.limits, temp_cap_C=temp_cap_C, power_budget=power_budget)
    return replace(cfg, controller=replace(cfg.controller, limits=limits))
