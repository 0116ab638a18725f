"""On the GPU, no policy's forward waits for the host: under `torch.cuda.set_sync_debug_mode("error")`,
which raises on any synchronising call, every policy runs

- its MoE layers alone (gate → router → grouped dispatch, with the routing recorder), and
- one whole forward of a tiny random MoE-DistilGPT2 in the grouped dispatch as the experiment runs
  it (`model(input_ids=ids, use_cache=False)` with the recorder on, then the chunk's NLL rows):
  the GPT-2 body around the MoE layers included (transformers' packed-sequence check, its one
  sync per forward, is answered without reading: nectar.models.default_positions).

The CPU counterpart, which counts host reads per forward (0 for every policy), is
tests/experiment/test_host_reads.py; the list of policies is the same."""

import pytest
import torch

from nectar.experiment.forward import install
from nectar.experiment.policies import policy_router
from nectar.experiment.token_nll import nll_rows
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from nectar.moe.dispatch import dispatch_path
from tests.experiment.test_host_reads import POLICIES

EXPERTS = [{"kind": "gelu", "hidden": 256, "count": 3}, {"kind": "gelu", "hidden": 64}, {"kind": "zero"},
           {"kind": "copy"}]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = preset_config("tiny-moe", vocab_size=256, n_layer=2, n_embd=128, n_head=2, n_inner=256,
                           n_positions=64, expert_specs=EXPERTS, n_experts=0)
    model = MoEGPT2LMHeadModel(config).to("cuda", torch.bfloat16).eval()
    for _, layer in model.moe_layers():
        layer.grouped = True
    return model


def run_without_syncs(fn) -> None:
    """fn() once to warm up (probes, lazy buffers), then once under sync debug mode "error"."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policys_moe_layers_run_without_a_host_sync(model, policy):
    layers = [layer for _, layer in model.moe_layers()]
    x = torch.randn(4096, model.config.n_embd, device="cuda", dtype=torch.bfloat16)
    install(model, [policy_router(policy, layer) for layer in layers])
    assert dispatch_path(x, layers[0].experts, True) == "grouped"
    recorder = model.new_recorder(sample_stride=4, max_sample_tokens=1024)

    def layers_forward():
        for layer in layers:
            layer(x)

    with torch.no_grad(), model.recording(recorder):
        run_without_syncs(layers_forward)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policys_whole_forward_runs_without_a_host_sync(model, policy):
    ids = torch.randint(0, model.config.vocab_size, (8, 64), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    install(model, [policy_router(policy, layer) for _, layer in model.moe_layers()])
    recorder = model.new_recorder(sample_stride=4, max_sample_tokens=256)
    rows = []

    def chunk_forward():                                       # nectar.experiment.forward.forward_chunk's loop
        rows.append(nll_rows(model(input_ids=ids, use_cache=False).logits, ids))

    with torch.no_grad(), model.recording(recorder):
        run_without_syncs(chunk_forward)
    assert torch.isfinite(torch.stack(rows)).all()
