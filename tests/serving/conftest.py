"""Fixtures the serving tests share: the tiny MoE-DistilGPT2 they serve and its token stream."""

import pytest
import torch

from tests.serving.models import tiny_gpt2_moe


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2_moe()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 211, (4000,), generator=torch.Generator().manual_seed(0))
