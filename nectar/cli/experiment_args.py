"""Options shared by the commands that run routing policies on a token stream (`run`, `frontier`,
`hw-run`): the stream, the controller and its limits, the simulator's pricing.

Each option has its help and default here once. This module imports nothing heavy (`--help` must
not import torch): the defaults of the controller's config classes are spelled out below, and
tests/cli/test_help.py checks that they agree with the code. `configs(args)` builds a `RunConfig`,
`backend_factory(args, cfg)` a zero-argument backend factory (backends refuse options they cannot
honour), `place_model` puts the model where the backend measures it.
"""

from __future__ import annotations

import argparse

from nectar.cli.common import non_negative_int, positive_float, positive_int

# Spelled-out defaults (tests/cli/test_help.py keeps them equal to the config classes').
MAX_PPL_INCREASE = 0.01      # GuardConfig.max_ppl_increase
BUDGET_USE = 0.9             # GuardConfig.budget_use
SHADOW_SHARE = 1 / 64        # ControllerConfig.shadow_share
SHADOW_AGREE = 1 / 3         # ControllerConfig.shadow_agree


def schedule(text: str):
    """argparse type: a power budget or heat schedule 'seconds:level,…' (or one number)."""
    from nectar.control.schedule import Schedule   # torch-free

    try:
        return Schedule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_stream_args(p: argparse.ArgumentParser, tokens: int = 65536, chunk_tokens: int = 4096,
                    seq_len: int | None = 256) -> None:
    p.add_argument("--tokens", type=positive_int, default=tokens,
                   help="stream tokens per policy; a multiple of --chunk-tokens")
    p.add_argument("--chunk-tokens", type=positive_int, default=chunk_tokens,
                   help="tokens per chunk (one controller step per chunk); a multiple of --seq-len")
    p.add_argument("--seq-len", type=positive_int, default=seq_len,
                   help="tokens per sequence; at most the model's n_positions")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="forward a chunk in micro-batches of this many sequences (default: the whole chunk)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="experiment seed (shadow sampling, mixtures, simulator noise); it does not choose the model")


def add_controller_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("NECTAR's controller and the operating limits")
    g.add_argument("--max-ppl-increase", type=positive_float, default=MAX_PPL_INCREASE,
                   help="quality bound: relative perplexity increase vs static routing (0.01 = 1%%)")
    g.add_argument("--budget-use", type=positive_float, default=BUDGET_USE,
                   help="share of the quality bound NECTAR aims to spend, in (0, 1]")
    g.add_argument("--price", type=positive_float, default=None,
                   help="initial price of quality μ; it then follows the budget (default: the router family's: "
                        "0.3 for NECTAR's router, 10 for a transformers MoE's adaptive k)")
    g.add_argument("--shadow-share", type=positive_float, default=SHADOW_SHARE,
                   help="share of the stream's sequences re-run under static routing for the paired quality check")
    g.add_argument("--shadow-agree", type=positive_float, default=SHADOW_AGREE,
                   help="checks thin out (up to 8x) while each one's measured perplexity cost is within this "
                        "multiple of the target of what the sensitivity model predicted (default 1/3)")
    g.add_argument("--temp-cap", type=float, default=None, help="hold the GPU below this temperature, °C (20-100)")
    g.add_argument("--power-budget", type=schedule, default=None,
                   help="hold mean power below this, W, or a schedule 'seconds:W,…' starting at 0")
    g.add_argument("--cost-calibration-s", type=positive_float, default=2.0,
                   help="time budget of the cost calibration before the first chunk, s (each expert's measured "
                        "time and energy per slot; the priced policies start from it)")
    g.add_argument("--no-cost-calibration", action="store_true",
                   help="skip the calibration: priced policies start from the FLOP prior")


def add_sim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulator")
    g.add_argument("--faults", default=None,
                   help="fault injection, e.g. 'stale:0.1,nan:0.05,hot_ambient:45' (sim/faults.py lists them)")
    g.add_argument("--gpu", default=None, help="GPU preset, name or JSON path (default: h100_sxm)")
    g.add_argument("--price-as", default="auto",
                   help="price routing at this shape (auto = distilgpt2; none = as it ran)")
    g.add_argument("--price-batch", type=positive_int, default=128,
                   help="sequences of 1024 tokens a stream chunk is priced as (128 ≈ 0.25 s on an H100)")
    g.add_argument("--heat", type=schedule, default=None,
                   help="extra ambient °C over simulated time, 'seconds:°C,…' (a co-tenant heating the GPU)")
    g.add_argument("--sim-cost-table", default=None, metavar="COST_TABLE_JSON",
                   help="price chunks by this measured per-expert cost table (a run's cost_table.json, for the "
                        "model it was measured on) instead of the roofline; the model is then priced as it runs")


def check_stream_args(args) -> None:
    """Checks that need neither torch nor the model (ValueError naming the option); with --model, what
    a transformers MoE folder lacks (`check_model_option`, which imports torch)."""
    if args.seq_len is not None and args.chunk_tokens % args.seq_len:
        raise ValueError(f"--chunk-tokens {args.chunk_tokens} is not a multiple of --seq-len {args.seq_len}")
    if args.tokens % args.chunk_tokens:
        lower = args.tokens // args.chunk_tokens * args.chunk_tokens
        choices = " or ".join(str(n) for n in (lower, lower + args.chunk_tokens) if n > 0)
        raise ValueError(f"--tokens {args.tokens} is not a multiple of --chunk-tokens {args.chunk_tokens}: use {choices}")
    if not 0 < args.max_ppl_increase < 1:
        raise ValueError(f"--max-ppl-increase must lie in (0, 1), got {args.max_ppl_increase}")
    if not 0 < args.budget_use <= 1:
        raise ValueError(f"--budget-use must lie in (0, 1], got {args.budget_use}")
    if not 0 < args.shadow_share <= 1:
        raise ValueError(f"--shadow-share must lie in (0, 1], got {args.shadow_share}")
    if args.temp_cap is not None and not 20 <= args.temp_cap <= 100:
        raise ValueError(f"--temp-cap must lie in [20, 100] °C, got {args.temp_cap}")
    check_model_option(getattr(args, "model", None))


def check_model_option(directory, option: str = "--model") -> None:
    """What a --model folder of another kind than a NECTAR checkpoint lacks, as one ValueError naming
    the file and how to make it (README: transformers MoE models). A folder of a supported
    transformers MoE family needs, beside save_pretrained's config.json and weights, the model's
    fast tokenizer (tokenizer.json) and the held-out stream heldout_ids.pt (else the built corpus's
    held-out split stands in); a model of any other type has no MoE blocks NECTAR can route. A
    NECTAR checkpoint, and a folder without a readable config.json, are left to the loader (its
    one-line errors name the file). Imports torch only when a folder is given."""
    import json
    from pathlib import Path

    if directory is None:
        return
    directory = Path(directory)
    config = directory / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return                                        # the loader says what is wrong with it
    from nectar.hf.families import SUPPORTED_MODEL_TYPES
    from nectar.models.gpt2_moe import MODEL_TYPE

    if model_type == MODEL_TYPE:
        return
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{option} {directory}: {config} describes a {model_type!r} model, which has no MoE blocks of a "
                         f"transformers family NECTAR supports ({', '.join(SUPPORTED_MODEL_TYPES)}) and is not a NECTAR "
                         f"MoE checkpoint ({MODEL_TYPE!r}, written by `nectar train --out DIR`)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        raise ValueError(f"{option} {directory} has config.json but no weights (model.safetensors, or shards with "
                         "their index): write both with model.save_pretrained(DIR)")
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{option} {directory} has no tokenizer.json: save the model's fast tokenizer beside its weights "
                         "(AutoTokenizer.from_pretrained(SRC).save_pretrained(DIR); README: transformers MoE models)")
    if not (directory / "heldout_ids.pt").is_file():
        from nectar.train.corpus import CorpusError, find_built_dir

        try:
            find_built_dir()
        except CorpusError:
            raise ValueError(f"{option} {directory} has no heldout_ids.pt, the held-out token stream the policies run on "
                             "(a 1-D integer tensor of more than 8192 token ids: torch.save(torch.tensor(tokenizer(text)"
                             "['input_ids'], dtype=torch.int32), DIR / 'heldout_ids.pt'); README: transformers MoE models), "
                             "and the built corpus, whose held-out split stands in for it, is not there either "
                             "(python scripts/build_corpus.py)") from None


def controller_config(args):
    from nectar.control.controller import ControllerConfig
    from nectar.control.limits import LimitConfig
    from nectar.control.quality_guard import GuardConfig

    limits = LimitConfig(temp_cap_C=args.temp_cap, power_budget=args.power_budget)
    guard = GuardConfig(max_ppl_increase=args.max_ppl_increase, budget_use=args.budget_use, price_init=args.price)
    return ControllerConfig(shadow_share=args.shadow_share, shadow_agree=args.shadow_agree, seed=args.seed,
                            limits=limits, guard=guard)


def configs(args, policies: list[str], interleave: bool | None = None):
    from nectar.experiment.runner import RunConfig

    from nectar.experiment.calibration import CalibrationConfig

    calibration = None if args.no_cost_calibration else CalibrationConfig(budget_s=args.cost_calibration_s)
    return RunConfig(policies=policies, tokens=args.tokens, chunk_tokens=args.chunk_tokens, seq_len=args.seq_len,
                     seed=args.seed, micro_batch_rows=args.micro_batch, interleave=interleave,
                     controller=controller_config(args), calibration=calibration)


def backend_factory(args, cfg, **extra):
    """A zero-argument factory of the chosen backend with the shared options."""
    from nectar.plugins import make_backend

    options = dict(seed=args.seed, preset=getattr(args, "gpu", None), faults=getattr(args, "faults", None),
                   price_as=getattr(args, "price_as", "none"), price_batch=getattr(args, "price_batch", 128),
                   chunk_rows=cfg.chunk_tokens // cfg.seq_len, heat=getattr(args, "heat", None), **extra)
    if getattr(args, "sim_cost_table", None) is not None:   # only then: other backends refuse the option
        options["cost_table"] = args.sim_cost_table
    return lambda: make_backend(args.backend, **options)


def place_model(model, torch_device: str):
    """The model where the backend measures it: bf16 on a GPU, fp32 on the CPU."""
    import torch

    if torch_device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this backend measures a CUDA GPU, but torch sees none")
        return model.to(torch_device, torch.bfloat16)
    return model.to(torch_device, torch.float32)


def check_model_fits(model, seq_len: int, option: str = "--seq-len") -> None:
    positions = getattr(model, "max_positions", None) or model.config.n_positions
    if seq_len > positions:
        raise ValueError(f"{option} {seq_len} exceeds the model's {positions} positions (n_positions in its config)")
