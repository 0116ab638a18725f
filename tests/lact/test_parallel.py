"""LaCT Algorithms 3 and 4 (nectar/lact/parallel.py) against the single-process kernel, on 2 and 4
gloo processes (CPU).

One process group per world size runs every case (starting a group costs about a second, a case
milliseconds): first the error cases (each must raise the same clear ValueError on every rank
without hanging the group), then the numeric cases. Each rank rebuilds the full tensors from one
seed, runs the single-process kernel `swiglu_fast_weight` on them and its own part of the parallel
one, and reports its outputs, final weights and the gradients of every input and what its forward
collectives carried; the test compares them with tolerances derived from the arithmetic
(`tests/tolerance.py`; "Tolerances" below says how). The launcher's
failure paths (a child that raises, a group that hangs) run in their own small groups.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import multiprocessing
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from nectar.lact.collectives import CommStats
from nectar.lact.fastweight import swiglu_fast_weight
from nectar.lact.launch import ChildFailed, run_group
from nectar.lact.parallel import (
    context_parallel_fast_weight,
    context_shard_index,
    head_parallel_fast_weight,
    head_shard,
)
from tests.lact import NS5_GAIN
from tests.tolerance import within

HEADS, DK, DV, DH = 4, 6, 5, 10  # non-square weights exercise Muon's transpose branch
WORLD_SIZES = (2, 4)
GROUP_TIMEOUT_S = 150.0
# fork skips re-importing torch in every child (~3 s each on 2 cores); each child uses one
# intra-op thread.
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

@dataclass(frozen=True)
class Case:
    """One comparison: an algorithm, a dtype, the kernel options and the stream geometry."""

    algorithm: str  # "context" (Alg. 3) | "head" (Alg. 4)
    dtype: str = "float64"
    use_muon: bool = False
    momentum: bool = False
    weight_norm: bool = True
    causal: bool = True
    length: int = 28  # 3 full chunks of 8 and a partial chunk of 4
    chunk_size: int = 8
    uneven_shards: bool = False  # Alg. 4: sequence shards of different lengths

    @property
    def name(self) -> str:
        flags = [f for f, on in (("muon", self.use_muon), ("mom", self.momentum), ("wn", self.weight_norm),
                                 ("causal", self.causal), ("uneven", self.uneven_shards)) if on]
        return f"{self.algorithm}-{self.dtype}-L{self.length}c{self.chunk_size}-{'+'.join(flags) or 'plain'}"


def _cases() -> list[Case]:
    grid = list(itertools.product((False, True), repeat=4))  # muon, momentum, weight norm, causal
    cases = [Case(a, "float64", *flags) for a in ("context", "head") for flags in grid]
    for algorithm in ("context", "head"):
        cases += [
            Case(algorithm, "float32", True, True, True, True),
            Case(algorithm, "float32", True, True, True, False),
            Case(algorithm, "float32", False, True, False, True),
            Case(algorithm, "float64", True, True, True, True, length=32),  # no partial chunk
            Case(algorithm, "float64", True, True, True, False, length=4),  # one partial chunk only
        ]
    cases.append(Case("head", "float64", True, True, True, True, length=29, chunk_size=5, uneven_shards=True))
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------- case data


def _full_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Full-sequence leaves (all heads) and loss cotangents, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    length = case.length
    data = {
        "q": randn(HEADS, length, DK, scale=DK**-0.5),
        "k": randn(HEADS, length, DK, scale=DK**-0.5),
        "v": randn(HEADS, length, DV),
        "w0": randn(HEADS, DH, DK, scale=DK**-0.5),
        "w1": randn(HEADS, DV, DH, scale=DH**-0.5),
        "w2": randn(HEADS, DH, DK, scale=DK**-0.5),
        "lr0": torch.sigmoid(randn(HEADS, length, 1)) * 0.3,
        "lr1": torch.sigmoid(randn(HEADS, length, 1)) * 0.3,
        "lr2": torch.sigmoid(randn(HEADS, length, 1)) * 0.3,
        "momentum": torch.sigmoid(randn(HEADS, length, 1)) if case.momentum else None,
        "g_out": randn(HEADS, length, DV),
        "g_w0": randn(HEADS, DH, DK),
        "g_w1": randn(HEADS, DV, DH),
        "g_w2": randn(HEADS, DH, DK),
    }
    return data


LEAVES = ("q", "k", "v", "w0", "w1", "w2", "lr0", "lr1", "lr2", "momentum")
TOKEN_LEAVES = ("q", "k", "v", "lr0", "lr1", "lr2", "momentum")
TOKEN_KEYS = (*TOKEN_LEAVES, "g_out")
WEIGHTS = ("w0", "w1", "w2")


def _leaves(data: dict) -> dict[str, torch.Tensor]:
    return {n: data[n].detach().clone().requires_grad_(True) for n in LEAVES if data[n] is not None}


def _call(fn, leaves: dict, case: Case, **extra):
    args = [leaves[n] for n in ("q", "k", "v", "w0", "w1", "w2", "lr0", "lr1", "lr2")]
    return fn(*args, case.chunk_size, use_muon=case.use_muon, momentum=leaves.get("momentum"),
              weight_norm=case.weight_norm, causal=case.causal, **extra)


def _loss(out, weights, g_out, g_weights) -> torch.Tensor:
    return (out * g_out).sum() + sum((w * g).sum() for w, g in zip(weights, g_weights))


def _reference(case: Case, data: dict) -> dict[str, torch.Tensor]:
    """Single-process outputs, final weights and gradients of every leaf."""
    leaves = _leaves(data)
    out, weights = _call(swiglu_fast_weight, leaves, case)
    loss = _loss(out, weights, data["g_out"], [data[f"g_{n}"] for n in WEIGHTS])
    grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
    result = {"out": out.detach(), **{f"final_{n}": w.detach() for n, w in zip(WEIGHTS, weights)}}
    result.update({f"grad_{n}": g for n, g in zip(leaves, grads)})
    return result


def _shard_lengths(case: Case, world: int) -> list[int]:
    if not case.uneven_shards:
        return [t.shape[0] for t in torch.arange(case.length).tensor_split(world)]
    cuts = [(i * case.length) // world + 3 * (i % 2) for i in range(1, world)]
    bounds = [0, *cuts, case.length]
    return [b - a for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- the group's part


def _token_positions(case: Case, rank: int, world: int) -> torch.Tensor:
    """Positions in the full stream of the tokens the rank holds."""
    if case.algorithm == "context":  # its slice of every chunk
        return context_shard_index(case.length, case.chunk_size, rank, world)
    lengths = _shard_lengths(case, world)  # one contiguous shard
    start = sum(lengths[:rank])
    return torch.arange(start, start + lengths[rank])


def _run_case(case: Case, rank: int, world: int) -> dict:
    """This rank's part of the parallel kernel: outputs, final weights, gradients of its leaves
    (for Alg. 3's replicated weights: this rank's share) and what its forward collectives carried."""
    data = _full_inputs(case)
    index = _token_positions(case, rank, world)
    head = case.algorithm == "head"
    weights_of = (lambda w: head_shard(w, rank, world)) if head else (lambda w: w)  # noqa: E731
    local = {n: (x.index_select(1, index) if n in TOKEN_KEYS else weights_of(x)) for n, x in data.items() if x is not None}
    leaves = _leaves({n: local.get(n) for n in LEAVES})
    stats = CommStats()
    fn = head_parallel_fast_weight if head else context_parallel_fast_weight
    out, weights = _call(fn, leaves, case, comm_stats=stats)
    # Alg. 3's final weights are replicated: their loss term is counted once (rank 0) and
    # zero-weighted elsewhere, so that every rank backpropagates through the same collectives
    g_weights = [local[f"g_{n}"] * (head or rank == 0) for n in WEIGHTS]
    loss = _loss(out, weights, local["g_out"], g_weights)
    grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
    return {"out": out.detach(), "final": [w.detach() for w in weights], "grads": dict(zip(leaves, grads)),
            "comm": {"calls": stats.calls, "payload_bytes": stats.payload_bytes}}


# ----------------------------------------------------------------------------- the test's part


def _assemble(case: Case, world: int, parts: list[dict]) -> dict[str, torch.Tensor]:
    """The ranks' parts put together into full-stream results, shaped like `_reference`'s."""
    positions = [_token_positions(case, rank, world) for rank in range(world)]
    order = torch.cat(positions).argsort()  # stream position -> place in the ranks' concatenation

    def stream(pieces: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(pieces, dim=1).index_select(1, order)  # [BH, L, ·]

    full = {"out": stream([part["out"] for part in parts])}
    full.update({f"grad_{n}": stream([part["grads"][n] for part in parts]) for n in parts[0]["grads"] if n in TOKEN_LEAVES})
    for i, n in enumerate(WEIGHTS):
        if case.algorithm == "head":  # each rank holds its own heads
            full[f"final_{n}"] = torch.cat([part["final"][i] for part in parts])
            full[f"grad_{n}"] = torch.cat([part["grads"][n] for part in parts])
        else:  # replicated: rank 0's final weights; the gradient is the sum of the ranks' shares
            full[f"final_{n}"] = parts[0]["final"][i]
            full[f"grad_{n}"] = torch.stack([part["grads"][n] for part in parts]).sum(dim=0)
    return full


def _cross_rank_spread(parts: list[dict]) -> dict[str, float]:
    """Alg. 3: per final weight, the largest difference between any rank's copy and rank 0's."""
    return {f"final_{n}": max((part["final"][i] - parts[0]["final"][i]).abs().max().item() for part in parts)
            for i, n in enumerate(WEIGHTS)}


@functools.cache
def _kernel_results(case: Case) -> dict[str, torch.Tensor]:
    """The single-process kernel on the full stream, computed in the test process on one thread
    (these tensors are tiny: on a loaded machine, waking a thread pool costs 10–100× the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(case, _full_inputs(case))
    finally:
        torch.set_num_threads(threads)


def case_failures(case: Case, world: int) -> dict[str, str]:
    """Quantity -> why it fails: the assembled parallel results vs the single-process kernel
    (every output, final weight and gradient); Alg. 3 also every rank's final weights vs rank
    0's; fp32 cases also the parallel results vs the fp64 kernel (the truth). Empty: all pass."""
    parts = [result["cases"][case.name] for result in group_results(world)]
    assembled = _assemble(case, world, parts)
    kernel = _kernel_results(case)
    assert assembled.keys() == kernel.keys(), (sorted(assembled), sorted(kernel))
    expected_keys = 4 + 9 + case.momentum  # out, final w0..w2, grads of q k v w0 w1 w2 lr0 lr1 lr2 (, momentum)
    assert len(kernel) == expected_keys, sorted(kernel)
    bound = tolerance(case)
    failures = {}
    for name, reference in kernel.items():
        ok, why = within(assembled[name], reference, **bound)
        if not ok:
            failures[name] = why
    if case.algorithm == "context":  # replicated weights: each rank's copy vs rank 0's
        for name, spread in _cross_rank_spread(parts).items():
            ok, why = within(spread, 0.0, scale=kernel[name].abs().max().item(), **bound)
            if not ok:
                failures[f"cross_rank_{name}"] = why
    if case.dtype != "float64":  # as close to the truth as the arithmetic allows
        truth = _kernel_results(dataclasses.replace(case, dtype="float64"))
        for name, reference in truth.items():
            ok, why = within(assembled[name], reference, **bound)
            if not ok:
                failures[f"vs_fp64_{name}"] = why
    return failures


# ----------------------------------------------------------------------------- error cases


def _small(batch=HEADS, length=8, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"q": r(batch, length, DK), "k": r(batch, length, DK), "v": r(batch, length, DV),
            "w0": r(batch, DH, DK), "w1": r(batch, DV, DH), "w2": r(batch, DH, DK),
            "lr0": r(batch, length, 1), "lr1": r(batch, length, 1), "lr2": r(batch, length, 1)}


def _args(t: dict) -> list[torch.Tensor]:
    return [t[n] for n in ("q", "k", "v", "w0", "w1", "w2", "lr0", "lr1", "lr2")]


def _error_calls(rank: int, world: int) -> dict:
    """Name -> zero-argument call that must raise ValueError on every rank."""
    own = lambda t: {**t, **{n: head_shard(t[n], rank, world) for n in WEIGHTS}}  # noqa: E731
    bad_lr = lambda t: {**t, "lr0": t["lr0"][:, :-1]} if rank == world - 1 else t  # noqa: E731
    return {
        "context_chunk_not_divisible": lambda: context_parallel_fast_weight(*_args(_small()), 2 * world + 1),
        "context_lengths_differ": lambda: context_parallel_fast_weight(*_args(_small(length=8 + (rank == 0))), 2 * world),
        "context_bad_shape_one_rank": lambda: context_parallel_fast_weight(*_args(bad_lr(_small())), 2 * world),
        "context_options_differ": lambda: context_parallel_fast_weight(*_args(_small()), 2 * world, use_muon=rank == 0),
        "head_heads_not_divisible": lambda: head_parallel_fast_weight(*_args(_small(batch=world + 1)), 4),
        "head_all_heads_weights": lambda: head_parallel_fast_weight(*_args(_small()), 4),
        "head_bad_shape_one_rank": lambda: head_parallel_fast_weight(*_args(bad_lr(own(_small()))), 4),
        "shard_index_last_chunk": lambda: context_shard_index(8 * 3 + 1, 8, rank, world),
    }


EXPECTED_MESSAGES = {
    "context_chunk_not_divisible": ["not divisible by the world size"],
    "context_lengths_differ": ["ranks disagree on local_length"],
    "context_bad_shape_one_rank": ["lr0 must have shape"],  # the bad rank; the others: see _expected
    "context_options_differ": ["ranks disagree on use_muon"],
    "head_heads_not_divisible": ["not divisible by the world size"],
    "head_all_heads_weights": ["own"],
    "head_bad_shape_one_rank": ["lr0 must have shape"],
    "shard_index_last_chunk": ["last chunk has"],
}


def _expected(name: str, rank: int, world: int) -> list[str]:
    """Message parts one of which rank `rank` must report (only the last rank's input is bad in
    the *_bad_shape_one_rank cases; the other ranks must name it)."""
    if name.endswith("bad_shape_one_rank") and rank != world - 1:
        return [f"invalid inputs on rank(s) [{world - 1}]"]
    return EXPECTED_MESSAGES[name]


def _check_errors(rank: int, world: int) -> dict[str, str]:
    messages = {}
    for name, call in _error_calls(rank, world).items():
        try:
            call()
            messages[name] = "NO ERROR RAISED"
        except ValueError as e:
            messages[name] = str(e)
    return messages


def group_worker(rank: int, world: int, cases: list[Case]) -> dict:
    """Runs in each spawned process: error cases first (the group must survive them), then cases."""
    errors = _check_errors(rank, world)
    return {"errors": errors, "cases": {case.name: _run_case(case, rank, world) for case in cases}}


@functools.cache
def group_results(world: int) -> list[dict]:
    return run_group(group_worker, world, CASES, timeout_s=GROUP_TIMEOUT_S, start_method=START_METHOD)


# ----------------------------------------------------------------------------- tests


# Tolerances (the rule of tests/tolerance.py: |parallel − kernel| ≤ safety · n · eps(dtype) · scale).
#
# n: both sides compute every compared quantity through the same chain of per-chunk sums, in
# another order. Alg. 3 sums each chunk's update as W partial sums and an all-reduce; Alg. 4 runs
# the kernel on 1/W of the heads on tokens gathered by an all-to-all (views whose reductions,
# e.g. the momentum-gate mean, and whose matmuls for another batch size may block their sums
# differently). Through that chain every final weight and every weight gradient is a sum of the
# contributions of all L tokens, every output depends on the updates of all earlier chunks and
# every token gradient on the backward pass of all later ones: n = L, the stream's length.
# scale: max|reference| of each quantity (normwise: an element that nearly cancels keeps its
# neighbours' absolute error).
# safety: 1 without Muon. With Muon, Newton–Schulz's quintic p(σ) = aσ + bσ³ + cσ⁵ has slope
# a = 3.4445 at σ = 0, so its five steps multiply rounding noise in an update's small singular
# directions by up to a⁵ ≈ 485, in the forward pass and (same Jacobian) in the backward pass. Such
# directions exist here: an update from l tokens has rank ≤ l, and the 4-token chunks (the last of
# L=28, the only one of L=4) leave the 10×6 updates of W0, W2 and the 5×10 one of W1 rank ≤ 4,
# i.e. singular values at rounding level. So safety = a⁵, derived, not fitted.
# Measured on these cases (worlds 2 and 4; torch 2.13.0 and 2.15.0 on CPU), the worst error in
# units of n · eps · scale (the bound with safety 1):
#   without Muon: fp64 0.18 (head L28 mom, grad_lr2), fp32 0.12 (context L28 mom+causal, grad_lr2)
#   with Muon:    fp64 94 (context L4 muon+mom+wn, W=4, grad_v), fp32 5.1 (context L28, grad_v)
#   fp32 parallel vs the fp64 kernel: 0.18 without Muon, 7.0 with Muon
#   Alg. 3 ranks' final weights vs rank 0's: 0 (the all-reduce hands every rank the same sums)
# so the worst case keeps a margin of ≥ 5× under safety 1 and a⁵. (With Muon the fp32 bound,
# a⁵ · 28 · eps ≈ 1.6e-3 relative, is what fp32 allows on a rank-deficient update.) The bounds
# still catch a wrong parallel code: planted in a scratch copy of parallel.py, one rank's partial
# update scaled by 1 + 1e-6 fails every fp64 Alg. 3 case (1 + 1e-4: the fp32 cases
# too, but Muon's at W = 4); one token dropped
# from the last rank's partial sums fails every Alg. 3 case with more than one token per rank and
# chunk, a momentum-gate divisor off by 0.01 every Alg. 3 case with momentum and several chunks
# (fp32 included); two tokens swapped by Alg. 4's all-to-all fail every Alg. 4 case.

def tolerance(case: Case) -> dict:
    """The `within`/`assert_close` arguments for a case: dtype, n and safety (see above)."""
    return {"dtype": getattr(torch, case.dtype), "n": case.length, "safety": NS5_GAIN if case.use_muon else 1.0}


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(world: int, case: Case) -> None:
    failures = case_failures(case, world)
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", sorted(EXPECTED_MESSAGES))
def test_clear_errors_on_every_rank(world: int, name: str) -> None:
    for rank, result in enumerate(group_results(world)):
        message = result["errors"][name]
        assert any(part in message for part in _expected(name, rank, world)), f"rank {rank}: {message}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_collectives_per_call(world: int, case: Case) -> None:
    """Alg. 3: one all-reduce per chunk of the three weight-sized updates (+ the momentum-gate
    sums); Alg. 4: one all-to-all of the packed inputs and one of the outputs per call."""
    itemsize = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    for rank, result in enumerate(group_results(world)):
        comm = result["cases"][case.name]["comm"]
        if case.algorithm == "context":
            chunks = -(-case.length // case.chunk_size)
            per_chunk = HEADS * (2 * DH * DK + DV * DH + case.momentum)
            assert comm == {"calls": chunks, "payload_bytes": chunks * per_chunk * itemsize}, f"rank {rank}"
        else:
            shard = _shard_lengths(case, world)[rank]
            features = 2 * DK + DV + 3 + case.momentum  # q, k, v, lr0..2 (, momentum)
            elements = HEADS * shard * features + HEADS // world * case.length * DV
            assert comm == {"calls": 2, "payload_bytes": elements * itemsize}, f"rank {rank}"


def test_shard_index_layout() -> None:
    """Rank r holds the r-th slice of every chunk; the slices of all ranks tile the stream."""
    index = [context_shard_index(28, 8, r, 4).tolist() for r in range(4)]
    assert index[1] == [2, 3, 10, 11, 18, 19, 25]
    assert sorted(sum(index, [])) == list(range(28))


# ----------------------------------------------------------------------------- launcher failures


def _raise_on_last_rank(rank: int, world: int) -> int:
    if rank == world - 1:
        raise ArithmeticError(f"planted failure on rank {rank}")
    dist.barrier()  # the other ranks wait for the failed one: the parent must not hang
    return rank


def _hang_on_last_rank(rank: int, world: int) -> int:
    if rank == world - 1:
        time.sleep(120)  # never joins the all-reduce below
    dist.all_reduce(torch.ones(1))
    return rank


def test_child_failure_is_raised_in_the_parent() -> None:
    with pytest.raises(ChildFailed, match="rank 1 failed first: ArithmeticError: planted failure on rank 1") as info:
        run_group(_raise_on_last_rank, 2, timeout_s=60, start_method=START_METHOD)
    assert info.value.rank == 1 and "_raise_on_last_rank" in str(info.value)  # the traceback comes along


def test_hanging_group_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 3\.0 s"):
        run_group(_hang_on_last_rank, 2, timeout_s=3.0, start_method=START_METHOD)
    assert time.monotonic() - start < 3.0 + 10.0  # timeout + SIGTERM/SIGKILL grace, not 120 s
