"""Dropped, unused, zero, copy and constant slots never reach an expert GEMM of the grouped dispatch:
the permutation gives every inactive (token, slot) pair the sentinel key E, so one stable sort puts
them after every expert and the per-expert counts (the grouped GEMMs' offsets) leave them out; the
zero / copy / constant experts run no GEMM at all. Static shapes throughout (no host read), and the
result equals the per-token loop for every expert kind, with drops."""

import pytest
import torch

import nectar.moe.dispatch as dispatch_module
from nectar.experiment.host_reads import count_host_reads
from nectar.moe.dispatch import dispatch, dispatch_path, grouped_mm_usable, permute_by_expert, reference_dispatch
from nectar.moe.expert_pool import ExpertPool
from nectar.moe.experts import ExpertSpec, build_experts
from nectar.moe.router import RoutingDecision
from nectar.moe.static_routers import CapacityRouter, TopKRouter
from tests.tolerance import assert_close

D = 16
KINDS = [ExpertSpec("gelu", 32, 3), ExpertSpec("gelu", 16, 2), ExpertSpec("swiglu", 24, 2), ExpertSpec("zero"),
         ExpertSpec("copy"), ExpertSpec("constant", count=2)]
E = 11
N_PATH = 2 * D + 32 + 2 * E + 4       # tests/moe/test_layer.py's rounding budget of a layer output (LAYER_N)


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", {"cpu": {torch.float32}})
    if not grouped_mm_usable(torch.randn(4, D)):
        pytest.skip("torch._grouped_mm is not usable on this CPU build")


@pytest.fixture
def gemm_rows(monkeypatch):
    """The rows each torch._grouped_mm call computes (its last offset, a tensor), in call order."""
    original, rows = torch._grouped_mm, []

    def grouped_mm(a, b, offs=None, **kwargs):
        rows.append(offs[-1].clone())
        return original(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    return rows


def pool(seed=0) -> ExpertPool:
    torch.manual_seed(seed)
    experts = ExpertPool.from_experts(build_experts(KINDS, D))
    with torch.no_grad():
        for name, param in experts.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    assert len(experts) == E
    return experts


def decision_with_drops(n: int, k: int, seed: int) -> RoutingDecision:
    """Top-k over random logits, then a random third of the slots dropped and a sixth unused; the
    dropped and unused slots keep nonzero gates and any expert index, so only the masks exclude them."""
    gen = torch.Generator().manual_seed(seed)
    decision = TopKRouter(E, k)(torch.randn(n, E, generator=gen) * 3)
    unused = torch.rand(n, k, generator=gen) < 1 / 6
    unused[:, 0] = False
    dropped = (torch.rand(n, k, generator=gen) < 1 / 3) & ~unused
    gates = decision.gates + 0.25 * (unused | dropped)
    return RoutingDecision(decision.experts, gates, decision.mask & ~unused, dropped, decision.probs, decision.logits)


def gemm_slots_per_group(experts: ExpertPool, decision: RoutingDecision) -> list[int]:
    """Active (token, slot) pairs routed into each GEMM group, in the pool's order."""
    active = decision.experts[decision.active]
    return [int(((active >= first) & (active < last)).sum()) for group, first, last in experts.spans()
            if group.runs_gemm]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_inactive_pairs_sort_after_every_expert(k, seed):
    decision = decision_with_drops(37, k, seed)
    perm = permute_by_expert(decision)
    active = decision.active.reshape(-1)
    assert torch.equal(perm.key, torch.where(active, decision.experts.reshape(-1), E))      # sentinel E
    assert torch.equal(perm.key[perm.order], perm.key[perm.order].sort().values)            # sorted by key
    assert torch.equal(perm.counts, torch.bincount(decision.experts[decision.active], minlength=E))
    assert torch.equal(perm.key[perm.order][int(active.sum()):], torch.full((int((~active).sum()),), E))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_gemms_compute_only_the_kept_rows_and_the_result_is_the_per_token_loop(grouped_on_cpu, gemm_rows, k, seed):
    experts = pool(seed)
    decision = decision_with_drops(41, k, seed)
    x = torch.randn(41, D)
    assert dispatch_path(x, experts) == "grouped"
    with torch.no_grad(), count_host_reads() as reads:
        y = dispatch(x, decision, experts)
    kept = gemm_slots_per_group(experts, decision)
    assert [int(r) for r in gemm_rows] == [rows for rows in kept for _ in range(2)]  # two matmuls per GEMM group
    inactive = int((~decision.active).sum())
    assert inactive > 0 and sum(kept) + inactive < decision.experts.numel()  # drops and cheap slots left out
    assert dict(reads) == {}
    with torch.no_grad():
        assert_close(y, reference_dispatch(x, decision, experts), n=N_PATH)


def test_capacity_drops_through_a_layer_equal_the_per_token_loop(grouped_on_cpu, gemm_rows):
    experts = pool()
    x = torch.randn(48, D)
    logits = torch.randn(48, E, generator=torch.Generator().manual_seed(3)) * 3
    decision = CapacityRouter(E, 2, capacity_factor=0.5)(logits)
    assert decision.dropped.any()
    with torch.no_grad():
        y = dispatch(x, decision, experts)
        assert_close(y, reference_dispatch(x, decision, experts), n=N_PATH)
    assert [int(r) for r in gemm_rows] == [rows for rows in gemm_slots_per_group(experts, decision) for _ in range(2)]


def test_loop_path_with_every_slot_dropped_is_zero():
    experts = pool()
    decision = decision_with_drops(9, 2, 0)
    none = RoutingDecision(decision.experts, decision.gates, decision.mask, torch.ones_like(decision.mask),
                           decision.probs, decision.logits)
    with torch.no_grad():
        assert torch.equal(dispatch(torch.randn(9, D), none, experts, grouped=False), torch.zeros(9, D))


def _slot_fractions(decision: RoutingDecision, used: list[float], seed: int) -> RoutingDecision:
    """The decision with slot k ≥ 1 computed by a `used[k-1]` share of the tokens (the rest dropped)."""
    gen = torch.Generator().manual_seed(seed)
    dropped = torch.zeros_like(decision.mask)
    for k, share in enumerate(used, start=1):
        dropped[:, k] = torch.rand(decision.mask.shape[0], generator=gen) >= share
    return RoutingDecision(decision.experts, decision.gates, decision.mask, dropped, decision.probs, decision.logits)


@pytest.mark.parametrize("used", [[0.0], [0.1], [0.9], [1.0], [0.0, 0.3], [0.2, 1.0]])
def test_the_loop_combine_by_slot_equals_the_per_token_loop(used):
    """A later slot that no token, a few tokens, most or all tokens compute (the three branches of
    combine_by_slot: skipped, index_add_ over its rows, dense gather) — the per-token loop, with one
    host read per forward whatever the drops."""
    experts = pool(1)
    n = 53
    decision = _slot_fractions(TopKRouter(E, 1 + len(used))(torch.randn(n, E, generator=torch.Generator().manual_seed(4)) * 3),
                               used, 5)
    x = torch.randn(n, D)
    with torch.no_grad(), count_host_reads() as reads:
        y = dispatch(x, decision, experts, grouped=False)
    assert sum(reads.values()) == 1
    with torch.no_grad():
        assert_close(y, reference_dispatch(x, decision, experts), n=N_PATH)


def test_first_true_lists_the_set_flags_in_order():
    from nectar.moe.dispatch import _first_true

    flag = torch.rand(101, generator=torch.Generator().manual_seed(6)) < 0.2
    assert torch.equal(_first_true(flag, int(flag.sum())), torch.nonzero(flag).squeeze(1))
    assert _first_true(torch.zeros(5, dtype=torch.bool), 0).numel() == 0
