"""NECTAR on data-parallel replicas (gloo, 2 and 4 CPU processes) against one process on the
concatenated stream.

The reference is one process that runs every chunk whole (its observation, its shadow re-run) on a
node of simulated GPUs: GPU r is a SimBackend of its own fed the workload of rows [r·m, (r+1)·m)
and of the quality check's rows among them (the check rides along in the chunk's window),
and the node's windows are `combine_windows` of the GPUs' (tested against hand-computed values in
tests/control/test_replicas.py). The replicas must then hold, after every chunk, the same price,
κ, λ, pressures and pauses, and at the end the same biases, as that one process's controller. The
model runs in float64; a replica's forward of its rows and the one process's forward of the whole
chunk are different matrix shapes, so per-row NLLs and logits may differ in the last bits: they are
compared to the rounding of the model's path (tests/tolerance.py, MODEL_N below), the controller's
state to that rounding carried through its sums over every chunk (CONTROLLER_N); counts and shapes
are compared exactly.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.limits import LimitConfig
from nectar.control.quality_guard import GuardConfig, QualityCheck
from nectar.control.replicas import ReplicaGroup, combine_windows
from nectar.control.schedule import Schedule
from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.policies import policy_router, prior_costs
from nectar.experiment.runner import RunConfig, run_experiment
from nectar.lact.launch import ChildFailed, run_group
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.workload import merge_workloads
from nectar.telemetry.window import TelemetryWindow
from nectar.train.recipes import load_demo_model
from sim.backend import SimBackend
from tests.tolerance import approx, assert_close

ROWS, SEQ, CHUNKS = 8, 32, 4
START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
# The tiny model's path (tests/conftest.py: 2 layers, width 32, hidden 64, ≤ 300 tokens of
# vocabulary): per layer two layer norms, c_attn, attention over SEQ keys, c_proj, the MoE gate and
# expert (tests/tolerance.py counts n as the reductions on the path), then the head and the
# log-softmax over the vocabulary.
MODEL_N = 2 * (9 * 32 + 2 * 64 + 2 * SEQ) + 2 * 32 + 2 * 300
# the controller sums NLLs and energies over the ROWS·SEQ tokens of each of the CHUNKS chunks
CONTROLLER_N = CHUNKS * (MODEL_N + ROWS * SEQ)
NLL_SCALE = 10.0  # nats: an upper bound of a per-token NLL over ≤ 300 tokens (log 300 ≈ 5.7) for this model


def _model(path: str):
    demo = load_demo_model(Path(path))
    return demo.model.to(torch.float64).eval(), list(demo.heldout_ids[: CHUNKS * ROWS * SEQ].view(CHUNKS, ROWS, SEQ))


def _backend(rank: int, ambient_C: float | None = None) -> SimBackend:
    return SimBackend(seed=rank, price_as="distilgpt2", price_batch=16, price_chunk_rows=ROWS, ambient_C=ambient_C)


def _config(**limits) -> RunConfig:
    controller = ControllerConfig(shadow_share=0.5, guard=GuardConfig(price_init=0.05),
                                  limits=LimitConfig(**(limits or {"power_budget": Schedule.constant(500.0)})))
    return RunConfig(policies=["nectar"], tokens=CHUNKS * ROWS * SEQ, chunk_tokens=ROWS * SEQ, seq_len=SEQ,
                     controller=controller)


def _group(fn, world: int, *args):
    return run_group(fn, world, *args, start_method=START, threads=1, timeout_s=120.0)


# ------------------------------------------------------------------------- (a) the gathered statistics

def _local_window(rank: int) -> TelemetryWindow:
    return TelemetryWindow(0.1 * rank, 1.0 + 0.3 * rank, 100.0 + rank, 250.0 + rank, 300.0, [60.0, 75.0, 55.0, 70.0][rank],
                           mem_used_B=100 * (rank + 1), mem_total_B=1000, samples=10 - rank)


def _gather_child(rank: int, world: int, path: str):
    model, chunks = _model(path)
    group = ReplicaGroup()
    install(model, [policy_router("fixed-bias:1", layer) for _, layer in model.moe_layers()])
    share = group.local_rows(chunks[0])
    observation = group.observation(forward_chunk(model, share, max_sample_tokens=group.sample_tokens(64)))
    window = group.window(_local_window(rank) if rank != 1 else None)        # rank 1 ran nothing this step
    rows = torch.tensor([0, 3, ROWS - 1])
    here = group.rows_here(rows, share.shape[0])
    local = None
    if here.numel():
        local = (torch.tensor([10.0 * (rank + 1)] * here.numel(), dtype=torch.float64), here.numel() * (SEQ - 1),
                 _local_window(rank))
    check = group.quality_check(rows, observation, local)
    return observation, window, check, here.tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_statistics_equal_one_process_on_the_concatenated_rows(tiny_model_dir, world):
    results = _group(_gather_child, world, str(tiny_model_dir))
    model, chunks = _model(str(tiny_model_dir))
    install(model, [policy_router("fixed-bias:1", layer) for _, layer in model.moe_layers()])
    whole = forward_chunk(model, chunks[0], max_sample_tokens=64)       # stride 4 over the whole chunk
    for observation, window, check, _ in results:                        # every replica holds the same
        assert observation.workload == whole.workload
        assert observation.nll_tokens == whole.nll_tokens
        assert_close(observation.nll_rows, whole.nll_rows, n=MODEL_N + SEQ, what="per-row NLL")
        assert observation.nll_sum == approx(whole.nll_sum, n=MODEL_N + ROWS * SEQ)
        assert observation.agreement == approx(whole.agreement, n=ROWS * SEQ)  # a mean of counts
        for mine, ref in zip(observation.layers, whole.layers):
            assert mine.logits.shape == ref.logits.shape == (64, ref.logits.shape[1])
            assert_close(mine.logits, ref.logits, n=MODEL_N, what="router logits")
            assert_close(mine.inputs, ref.inputs, n=MODEL_N, what="router inputs")
        ran = [r for r in range(world) if r != 1]
        assert window.energy_J == approx(sum(100.0 + r for r in ran), n=world)
        assert window.mean_power_W == sum(250.0 + r for r in ran)
        assert window.duration_s == approx(max(1.0 + 0.2 * r for r in ran), n=4)  # ×, +, a difference of times
        assert window.gpu_temp_C == max([60.0, 75.0, 55.0, 70.0][r] for r in ran)
        assert window.replica_temp_C == [[60.0, 75.0, 55.0, 70.0][r] for r in ran]
        assert window.memory_pressure == max(0.1 * (r + 1) for r in ran) and window.samples == 10 - max(ran)
        # the check: rows 0, 3 and 7 of the chunk; replica r re-ran those in its share, NLL 10·(r+1) each
        holders = [int(row) // (ROWS // world) for row in (0, 3, ROWS - 1)]
        adapted = float(whole.nll_rows[[0, 3, ROWS - 1]].sum())
        assert check.tokens == 3 * (SEQ - 1)
        assert check.adapted_nll == approx(adapted / check.tokens, n=MODEL_N + 3 * SEQ)
        assert check.static_nll == approx(sum(10.0 * (h + 1) for h in holders) / check.tokens, n=4)
        assert check.window.replica_energy_J == [100.0 + r for r in sorted(set(holders))]
    assert sum(len(r[3]) for r in results) == 3


# ------------------------------------------------------------------------- (b) the key test

def _replicated_run_child(rank: int, world: int, path: str, limits: dict):
    model, chunks = _model(path)
    torch.manual_seed(0)
    hot = limits.pop("hot_ambient_C", None)                                  # the last replica's GPU runs hot
    ambient = hot if rank == world - 1 else None
    (run,) = run_experiment(model, chunks, lambda: _backend(rank, ambient), _config(**limits), progress=False,
                            replicas=ReplicaGroup())
    extras = [row.extra for row in run.trace if row.kind == "chunk" and row.policy == "nectar"]
    return [asdict(r) for r in run.records], [r.bias.tolist() for r in run.routers], extras


def _reference(path: str, world: int, cfg: RunConfig):
    """One process, the whole chunks, the node of `world` simulated GPUs (see the module docstring)."""
    model, chunks = _model(path)
    torch.manual_seed(0)
    layers = [layer for _, layer in model.moe_layers()]
    routers = [policy_router("nectar", layer, seed=cfg.seed) for layer in layers]
    static = [policy_router("static-top2", layer) for layer in layers]
    controller = NectarController(routers, cfg.controller, cost_layers=[i for i, _ in model.moe_layers()],
                                  start_costs=[prior_costs(layer) for layer in layers])
    gpus, m = [_backend(r) for r in range(world)], ROWS // world
    records = []

    def on_gpu(r, chunk, checks):
        """GPU r's window: its share of the chunk, then its rows of the quality check (static routing)."""
        def compute():
            install(model, routers)
            workload = forward_chunk(model, chunk[r * m:(r + 1) * m]).workload
            if checks:
                install(model, static)
                workload = merge_workloads([workload, forward_chunk(model, chunk[checks]).workload])
                install(model, routers)
            return workload
        return gpus[r].run_chunk(compute)

    for chunk in chunks:
        install(model, routers)
        planned = controller.planned_check(chunk.shape[0])                    # the check rides along
        observation = forward_chunk(model, chunk)
        rows_of_gpu = [[] if planned is None else [int(x) for x in planned if int(x) // m == r] for r in range(world)]
        window = combine_windows([on_gpu(r, chunk, rows_of_gpu[r]) for r in range(world)])
        share = 0.0 if planned is None else planned.numel() / (chunk.shape[0] + planned.numel())

        def shadow(rows, chunk=chunk, observation=observation, window=window, share=share):
            install(model, static)
            static_run = forward_chunk(model, chunk[rows])
            install(model, routers)
            adapted, tokens = observation.rows_nll(rows)
            return QualityCheck(adapted / tokens, static_run.nll_sum / static_run.nll_tokens, tokens,
                                energy_J=share * window_energy_J(window), seconds=share * window.duration_s)

        record = controller.after_chunk(observation, window, shadow)
        if record.pause_s > 0:
            controller.limits.observe_idle(combine_windows([gpu.idle(record.pause_s) for gpu in gpus]))
        records.append((record, window))
    return records, [r.bias.tolist() for r in routers]


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_controller_equals_one_process_on_the_concatenated_stream(tiny_model_dir, world):
    results = _group(_replicated_run_child, world, str(tiny_model_dir), {})
    reference, biases = _reference(str(tiny_model_dir), world, _config())
    first_records, first_biases, _ = results[0]
    for records, replica_biases, _ in results[1:]:
        assert records == first_records and replica_biases == first_biases      # one state on every replica
    assert len(first_records) == CHUNKS
    paused = 0
    for mine, (ref, window) in zip(first_records, reference):
        for key in ("lam", "price", "kappa", "nu_temp", "nu_power", "deviation", "alpha", "pause_s", "guard_energy_J"):
            assert mine[key] == approx(getattr(ref, key), n=CONTROLLER_N), key
        assert (mine["delta_nll"] is None) == (ref.delta_nll is None)
        if ref.delta_nll is not None:
            # a difference of two mean NLLs (adapted − static) that nearly cancel: the rounding is
            # relative to the NLLs (a few nats each), not to their difference
            assert mine["delta_nll"] == approx(ref.delta_nll, n=CONTROLLER_N, scale=NLL_SCALE)
        assert mine["fallback"] == ref.fallback and mine["skipped"] == ref.skipped
        # the check rode along: the window's energy splits between chunk and check
        assert mine["energy_J"] + mine["guard_energy_J"] == approx(window.energy_J, n=world + 2)
        assert mine["temp_C"] == window.gpu_temp_C
        assert mine["expert_counts"] == window.workload.expert_counts()
        paused += mine["pause_s"] > 0
    assert paused > 0 and first_records[-1]["nu_power"] > 0                  # the pressures and pauses took part
    assert_close(torch.tensor(first_biases), torch.tensor(biases), n=CONTROLLER_N, what="final biases")
    assert torch.tensor(first_biases).abs().max() > 0.1                       # the biases moved


def test_one_replica_equals_the_plain_run(tiny_model_dir):
    """World size 1: the data-parallel hooks change nothing but the counter readings they drop."""
    ((records, biases, _),) = _group(_replicated_run_child, 1, str(tiny_model_dir), {})
    model, chunks = _model(str(tiny_model_dir))
    torch.manual_seed(0)
    (run,) = run_experiment(model, chunks, lambda: _backend(0), _config(), progress=False)
    plain = [asdict(r) for r in run.records]
    for mine, ref in zip(records, plain):
        assert {k: v for k, v in mine.items() if not k.startswith("energy_mJ")} == \
               {k: v for k, v in ref.items() if not k.startswith("energy_mJ")}
    assert biases == [r.bias.tolist() for r in run.routers]


# ------------------------------------------------------------------------- (c) each GPU's temperature cap

def test_the_hottest_gpu_drives_the_shared_temperature_pressure(tiny_model_dir):
    cap = 50.0
    results = _group(_replicated_run_child, 2, str(tiny_model_dir), {"temp_cap_C": cap, "hot_ambient_C": 60.0})
    (records, biases, extras), (records_hot, biases_hot, _) = results
    assert records == records_hot and biases == biases_hot
    limit = LimitConfig(temp_cap_C=cap)
    cool = [e["replica_temp_C"][0] for e in extras]
    hot = [e["replica_temp_C"][1] for e in extras]
    assert max(cool) < limit.temp_limit_C - 2 * limit.temp_margin_C            # alone, no pressure
    assert min(hot) > limit.temp_limit_C                                       # over the cap
    assert [r["temp_C"] for r in records] == hot                               # the node reads the hottest GPU
    assert all(r["nu_temp"] > 0 for r in records) and records[-1]["nu_temp"] > records[0]["nu_temp"]


# ------------------------------------------------------------------------- (d) clear errors, no hang

def _errors_child(rank: int, world: int, path: str):
    model, chunks = _model(path)
    messages = []
    cases = [(chunks, _config(), {"price_init": 0.05 if rank == 0 else 0.1}),   # mismatched settings
             ([c[:6] for c in chunks], _config(), {}),                           # rows not divisible
             ([c[:, : SEQ - rank] for c in chunks], _config(), {})]              # different streams
    for chunk_list, cfg, guard in cases:
        cfg = replace(cfg, controller=replace(cfg.controller, guard=replace(cfg.controller.guard, **guard)))
        try:
            run_experiment(model, chunk_list, lambda: _backend(rank), cfg, progress=False, replicas=ReplicaGroup())
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


@pytest.mark.parametrize("world", [4])
def test_clear_errors_on_every_replica(tiny_model_dir, world):
    results = _group(_errors_child, world, str(tiny_model_dir))
    for mismatch, indivisible, stream in results:
        assert "disagree on controller.guard.price_init: rank 0 has 0.05, rank 1 has 0.1" in mismatch
        assert f"a chunk of 6 sequences cannot be split evenly over {world} replicas" in indivisible
        assert "disagree on chunk_shapes" in stream
    with pytest.raises(ChildFailed, match="cannot be split evenly"):
        _group(_indivisible_child, 2, str(tiny_model_dir))


def _indivisible_child(rank: int, world: int, path: str):
    model, chunks = _model(path)
    run_experiment(model, [c[:3] for c in chunks], lambda: _backend(rank), _config(), progress=False,
                   replicas=ReplicaGroup())
