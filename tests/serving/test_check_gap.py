"""What a checked decode step's quality gap is: the paired NLL of the next reference token ("nll"),
or the vocabulary KL(p_static ‖ p_routed) of the row's next-token distribution ("kl"). The reference
for the KL is torch.distributions' own, on the log-probs the engine returned for the shadow (static)
and the routed forward of the same checked step."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from nectar.serving.controller import ServingController, ServingControllerConfig, check_gap_R
from nectar.serving.engine import ServingEngine, StepResult
from nectar.serving.frontier import ServingConfig, serve_policy
from tests.serving.test_check_share import LIMITS, TRACE


def _result(logits_RV: torch.Tensor, targets_R: torch.Tensor, keep: bool = True) -> StepResult:
    logp_RV = torch.log_softmax(logits_RV, dim=-1)
    return StepResult(-logp_RV.gather(-1, targets_R[:, None])[:, 0], logits_RV.argmax(-1), None,
                      logp_RV if keep else None)


def test_the_gap_of_a_row_by_kind():
    gen = torch.Generator().manual_seed(0)
    static_RV, routed_RV = torch.randn(3, 50, generator=gen), torch.randn(5, 50, generator=gen)
    targets = torch.randint(0, 50, (5,), generator=gen)
    static, routed = _result(static_RV, targets[:3]), _result(routed_RV, targets)
    want_kl = kl_divergence(Categorical(logits=static_RV), Categorical(logits=routed_RV[:3]))
    assert torch.allclose(check_gap_R("kl", routed, static, 3), want_kl, rtol=1e-5, atol=1e-6)
    assert torch.equal(check_gap_R("nll", routed, static, 3), routed.nll_R[:3] - static.nll_R)
    with pytest.raises(RuntimeError, match="keep_logp"):
        check_gap_R("kl", _result(routed_RV, targets, keep=False), static, 3)


def test_kl_checks_price_each_checked_step_by_its_rows_kl(model, stream, monkeypatch):
    """Serving with check_gap="kl": every gap the controller receives is the summed KL of its checked
    step's shadow and routed log-probs, and steps without a check keep no log-probs."""
    pytest.importorskip("simpy", reason="the serving loop runs on the simulator's clock (the GPU hosts have no simpy)")
    from nectar.plugins import make_backend

    decodes, gaps = [], []
    decode, add_gap = ServingEngine.decode, ServingController.add_gap

    def recording_decode(self, tokens, positions, targets):
        result = decode(self, tokens, positions, targets)
        decodes.append((self.cache.read_only, result))
        return result

    def recording_add_gap(self, gap, tokens, mass=None):
        gaps.append(float(gap))
        return add_gap(self, gap, tokens, mass)

    monkeypatch.setattr(ServingEngine, "decode", recording_decode)
    monkeypatch.setattr(ServingController, "add_gap", recording_add_gap)
    cfg = ServingConfig(TRACE, LIMITS, policies=("nectar",),
                        controller=ServingControllerConfig(check_every=3, window_steps=3, check_gap="kl"))
    serve_policy(model, make_backend("sim", seed=0, price_as="none"), "nectar", cfg, stream)

    shadows = [i for i, (read_only, _) in enumerate(decodes) if read_only]
    assert len(shadows) == len(gaps) > 2
    for i, gap in zip(shadows, gaps):
        static, routed = decodes[i][1], decodes[i + 1][1]          # the check's shadow, then the step itself
        rows = static.logp_RV.shape[0]
        want = kl_divergence(Categorical(logits=static.logp_RV), Categorical(logits=routed.logp_RV[:rows])).sum()
        assert gap == pytest.approx(float(want), rel=1e-4, abs=1e-6)
        assert gap >= -1e-6                                         # a KL
    unchecked = [r for k, (read_only, r) in enumerate(decodes) if not read_only and k - 1 not in shadows]
    assert unchecked and all(r.logp_RV is None for r in unchecked)
