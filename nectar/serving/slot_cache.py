"""A KV cache of fixed slots for continuous batching, usable by transformers' own attention code.

Serving keeps one request per *slot*: keys and values live in preallocated buffers
[slots, kv_heads, max_tokens, head_dim] per layer, and a request's position t sits at index t of
its slot. Decoding requests occupy slots 0..B-1 (the scheduler keeps them contiguous), so a decode
forward runs on the first B rows with views of the buffers (no copy); a prefill chunk writes one
slot. A request leaving moves another's slot into its place (`move`).

transformers' attention modules (GPT-2, OLMoE and the other v5 families) call
`cache.update(keys, values, layer_idx)` and attend over what it returns with the attention mask
they are given. `SlotCache` is such a cache: before each forward, `for_decode` / `for_prefill` say
where the new positions go and return the forward's `position_ids` and a 4-D additive attention
mask (transformers uses a 4-D mask as it is: no mask construction, no host read). Each request
attends to its own slot's positions 0..t only; positions beyond a row's length are masked out.

Shapes never depend on tensor values: the visible length is a host int the scheduler knows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True)
class CacheShape:
    """What a model's attention stores per position: layers, key/value heads and head width."""

    layers: int
    kv_heads: int
    head_dim: int

    @staticmethod
    def of(config) -> "CacheShape":
        """Read from a transformers config (GPT-2's names map through its attribute_map)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return CacheShape(int(text.num_hidden_layers), kv_heads, head_dim)


@dataclass
class _Target:
    """Where the current forward writes: rows of the buffers and the position of each new key."""

    rows: slice                 # slots the forward covers (its batch rows, in order)
    write_R: torch.Tensor       # [R] slot index of each batch row (decode) — unused for prefill
    pos: torch.Tensor           # [R] (decode) or [q] (prefill) position of each new key
    visible: int                # positions 0..visible-1 are returned to attention
    decode: bool


class SlotCache(Cache):
    """Keys and values of `slots` requests of at most `max_tokens` positions each."""

    def __init__(self, shape: CacheShape, slots: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__(layers=[])
        if slots < 1 or max_tokens < 1:
            raise ValueError(f"a slot cache needs slots >= 1 and max_tokens >= 1, got {slots} and {max_tokens}")
        self.shape, self.slots, self.max_tokens = shape, slots, max_tokens
        size = (slots, shape.kv_heads, max_tokens, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]    # [S, H, T, dh]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]  # [S, H, T, dh]
        self._target: _Target | None = None
        self._neg = torch.finfo(dtype).min
        self.read_only = False   # a shadow forward (a quality check): attend as if written, write nothing

    # ------------------------------------------------------------------ per forward
    def for_decode(self, positions_R: torch.Tensor, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..R-1 each write one key at `positions_R` [R] (device long); `visible` = 1 + the
        largest position (a host int). Returns (position_ids [R, 1], mask [R, 1, 1, visible])."""
        rows = positions_R.shape[0]
        self._check(rows, visible)
        device = self.keys[0].device
        self._target = _Target(slice(0, rows), torch.arange(rows, device=device), positions_R, visible, True)
        keep_RT = torch.arange(visible, device=device)[None, :] <= positions_R[:, None]  # [R, visible]
        return positions_R[:, None], self._additive(keep_RT[:, None, None, :])

    def for_prefill(self, slot: int, start: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot `slot` writes positions start..start+n-1 (one request's prompt chunk). Returns
        (position_ids [1, n], causal mask [1, 1, n, start+n])."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        visible = start + n_tokens
        self._check(1, visible)
        device = self.keys[0].device
        pos_q = torch.arange(start, visible, device=device)                               # [n]
        self._target = _Target(slice(slot, slot + 1), pos_q.new_tensor([slot]), pos_q, visible, False)
        keep_qT = torch.arange(visible, device=device)[None, :] <= pos_q[:, None]         # [n, visible]
        return pos_q[None, :], self._additive(keep_qT[None, None])

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` in every layer (a request moving to a freed slot)."""
        for buf in (*self.keys, *self.values):
            buf[dst].copy_(buf[src])

    # ------------------------------------------------------------------ transformers' interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the forward's new keys/values [R, H, q, dh] and return all visible ones
        [R, H, visible, dh] of its rows."""
        t = self._target
        if t is None:
            raise RuntimeError("SlotCache.update outside a forward: call for_decode or for_prefill first")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.read_only:                      # copies of the visible rows take the new positions
            keys, values = keys[t.rows, :, : t.visible].clone(), values[t.rows, :, : t.visible].clone()
            t = replace(t, rows=slice(0, keys.shape[0]))
        if t.decode:
            keys[t.write_R, :, t.pos] = key_states[:, :, 0].to(keys.dtype)      # [R, H, dh]
            values[t.write_R, :, t.pos] = value_states[:, :, 0].to(values.dtype)
        else:
            keys[t.rows, :, t.pos] = key_states.to(keys.dtype)                  # [1, H, n, dh]
            values[t.rows, :, t.pos] = value_states.to(values.dtype)
        return keys[t.rows, :, : t.visible], values[t.rows, :, : t.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._target is None else self._target.visible

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        visible = 0 if self._target is None else self._target.visible
        return visible, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.shape.layers

    # ------------------------------------------------------------------ helpers
    def _additive(self, keep: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.keys[0].dtype, device=keep.device)
        return torch.where(keep, zero, torch.full_like(zero, self._neg))

    def _check(self, rows: int, visible: int) -> None:
        if rows > self.slots:
            raise ValueError(f"{rows} rows do not fit a cache of {self.slots} slots")
        if visible > self.max_tokens:
            raise ValueError(f"position {visible - 1} is beyond the cache's {self.max_tokens} positions")
