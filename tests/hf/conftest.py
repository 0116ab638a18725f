"""One intra-op thread for these tiny models: on a shared, loaded CPU torch's multi-threaded
index_add_ (the eager experts' combine) takes ~0.1 s per call on a [48, 32] tensor; with one
thread the whole tiny forward takes milliseconds. Restored after every test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
