"""A GPT-2 forward without transformers' one host read per forward: the packed-sequence check.

Given no attention mask and no cache (the experiment's forward: `model(input_ids=ids,
use_cache=False)`), transformers' `create_causal_mask` asks whether the position ids describe
several sequences packed into one row (`masking_utils.find_packed_sequence_indices`): it takes
the positions' differences and reads `(packed[:, -1] == 0).all()` back to the host. On a GPU that
is a synchronisation, one per forward, whatever the MoE layers do. GPT-2 always builds the
position ids before it asks: when the caller gives none they are 0..T-1 (after the cached tokens;
the check runs only without a cache), one sequence per row, and the answer is known beforehand:
not packed (None). Then transformers goes on exactly as before: no padding mask, so no mask at
all and SDPA's `is_causal`; the logits are bit-for-bit those of the checked forward.

`default_positions()` is the context under which `find_packed_sequence_indices` gives that
answer without computing it; `MoEGPT2LMHeadModel.forward` opens it when the caller passes no
position ids. Everywhere else (other models, other threads, explicit position ids) the check
runs as transformers wrote it. If a transformers version has no such function, nothing is
patched and the read comes back (tests/experiment/test_host_reads.py would then fail).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from transformers import masking_utils

_DEFAULT_POSITIONS: ContextVar[bool] = ContextVar("nectar_default_positions", default=False)
PATCHED_NAME = "find_packed_sequence_indices"


def _install() -> bool:
    """Wrap transformers' packed-sequence check once (idempotent); False when it does not exist."""
    original = getattr(masking_utils, PATCHED_NAME, None)
    if original is None:
        return False
    if getattr(original, "__nectar_default_positions__", False):
        return True

    @functools.wraps(original)
    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if _DEFAULT_POSITIONS.get():
            return None                         # 0..T-1 in every row: one sequence per row, not packed
        return original(position_ids, *args, **kwargs)

    find_packed_sequence_indices.__nectar_default_positions__ = True
    setattr(masking_utils, PATCHED_NAME, find_packed_sequence_indices)
    return True


INSTALLED = _install()


@contextmanager
def default_positions(active: bool = True) -> Iterator[None]:
    """While open (and `active`), transformers takes the position ids of this thread's forward to be
    GPT-2's own default 0..T-1 and skips the packed-sequence check. Open it only around a forward
    whose caller passed no position ids."""
    token = _DEFAULT_POSITIONS.set(bool(active))
    try:
        yield
    finally:
        _DEFAULT_POSITIONS.reset(token)
