"""The engine's key/value cache: one slot per sampled row (a guidance branch of a running take).

Per layer, keys and values live in two buffers (slots, heads, capacity, head_dim) in the model's dtype.
A slot holds its row's tokens in the order the block sampler attends to them: the text, then every
clean block, then (during a call) the call's own tokens. The rows in use are always the first
`active` slots: a freed slot is filled by moving the last active row into it (one copy of that row's
keys and values), so a call over every active row attends to a view of the buffers' first slots,
never to a gathered copy of the histories.

A call covers a contiguous range of slots. `prepare` gives, per row, where its call tokens are written
(after what it keeps) and how many keys it attends to; the keys past a row's own (the padding up to the
longest row of the call) are hidden by a boolean key-padding mask, which `DR2DiT`'s attention takes
from `key_mask`. Buffers start zeroed, so padded keys are always finite numbers (a masked key must not
be NaN: SDPA adds -inf to its score, and NaN + -inf is NaN).
"""

from __future__ import annotations

import torch


class SlotCache:
    """Implements the cache interface `DR2DiT.forward` uses: `update(layer, k, v)` and `key_mask`."""

    def __init__(self, depth: int, heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device):
        self.depth, self.heads, self.head_dim = depth, heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slots = 0  # allocated
        self.capacity = 0  # tokens per slot, allocated
        self.active = 0
        self.key_mask: torch.Tensor | None = None
        self._call: tuple[int, int, torch.Tensor, int] | None = None  # lo, n, write positions, keys

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one row takes over all layers (keys and values)."""
        return self.depth * 2 * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        return self.slots * self.capacity * self.bytes_per_token

    def resize(self, slots: int, capacity: int) -> None:
        """Make the buffers `slots` x `capacity` tokens (slots >= active, capacity never smaller),
        keeping the active rows' contents (one copy of each, only when the size changes)."""
        if slots < self.active or capacity < self.capacity:
            raise ValueError(
                f"cannot hold {self.active} rows of {self.capacity} tokens in {slots} x {capacity}"
            )
        if slots == self.slots and capacity == self.capacity:
            return
        shape = (slots, self.heads, capacity, self.head_dim)
        for group in (self.k, self.v):
            for layer in range(self.depth):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(group):
                    fresh[: self.active, :, : self.capacity] = group[layer][: self.active]
                    group[layer] = fresh
                else:
                    group.append(fresh)
        self.slots, self.capacity = slots, capacity

    def release(self) -> None:
        """Drop the buffers (only when no row is active)."""
        assert self.active == 0
        self.k, self.v, self.slots, self.capacity = [], [], 0, 0

    def add(self) -> int:
        """Take the next free slot; the caller has resized the buffers for it."""
        if self.active >= self.slots:
            raise RuntimeError(f"no free slot ({self.slots} allocated)")
        self.active += 1
        return self.active - 1

    def free(self, slot: int) -> int | None:
        """Free a slot; the last active row moves into it. Returns the slot that moved (now `slot`), or
        None when the freed slot was the last one."""
        last = self.active - 1
        self.active = last
        if slot == last:
            return None
        for group in (self.k, self.v):
            for buf in group:
                buf[slot] = buf[last]
        return last

    def prepare(self, lo: int, starts: torch.Tensor, n_query: int, lengths: torch.Tensor) -> None:
        """The next call covers slots lo .. lo + len(starts) - 1; row i writes its n_query tokens at
        starts[i] onwards and attends to its first lengths[i] keys (starts, lengths: (n,) long on the
        cache's device)."""
        n = starts.shape[0]
        keys = int(lengths.max())
        if keys > self.capacity or int((starts + n_query).max()) > self.capacity:
            raise ValueError(f"a slot holds {self.capacity} tokens; a call needs {keys}")
        write = starts[:, None] + torch.arange(n_query, device=self.device)[None]
        self._call = (lo, n, write, keys)
        self.key_mask = (torch.arange(keys, device=self.device)[None] < lengths[:, None])[:, None, None]

    def finish(self) -> None:
        self._call, self.key_mask = None, None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._call is not None, "prepare() the call first"
        lo, n, write, keys = self._call
        rows = torch.arange(n, device=self.device)[:, None]
        kb, vb = self.k[layer][lo : lo + n], self.v[layer][lo : lo + n]
        # advanced indices on dims 0 and 2: the assigned value is laid out (n, tokens, heads, e)
        kb[rows, :, write] = k.permute(0, 2, 1, 3)
        vb[rows, :, write] = v.permute(0, 2, 1, 3)
        return kb[:, :, :keys], vb[:, :, :keys]
