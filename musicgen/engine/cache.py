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
from `key_mask` (one fused kernel over every row: CUDA). On the CPU the cache gives `key_lengths`
instead, and the attention runs each row over its own keys only (`Attention.attend_rows`): there the
fused kernel computes every padded key. Buffers start zeroed, so padded keys are always finite numbers
(a masked key must not be NaN: SDPA adds -inf to its score, and NaN + -inf is NaN).
"""

from __future__ import annotations

import torch

from musicgen.runtime.device import host_tensor


class SlotCache:
    """Implements the cache interface `DR2DiT.forward` uses: `update(layer, k, v)`, `key_mask` and
    `key_lengths`."""

    def __init__(
        self,
        depth: int,
        heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        ragged: bool | None = None,
    ):
        self.depth, self.heads, self.head_dim = depth, heads, head_dim
        self.dtype, self.device = dtype, device
        # per-row key lengths instead of a key-padding mask (default: on the CPU)
        self.ragged = device.type == "cpu" if ragged is None else ragged
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slots = 0  # allocated
        self.capacity = 0  # tokens per slot, allocated
        self.active = 0
        self.key_mask: torch.Tensor | None = None
        self.key_lengths: list[int] | None = None
        # lo, write positions, keys, row indices of the call
        self._call: tuple[int, torch.Tensor, int, torch.Tensor] | None = None
        self.generation = 0  # + 1 whenever the buffers are reallocated (what a CUDA graph of a call reads)

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
        self.generation += 1
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
        self.generation += 1

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

    def prepare(self, lo: int, starts: list[int], n_query: int, lengths: list[int]) -> None:
        """The next call covers slots lo .. lo + len(starts) - 1; row i writes its n_query tokens at
        starts[i] onwards and attends to its first lengths[i] keys (host lists: nothing is read back
        from the device)."""
        keys = max(lengths)
        if keys > self.capacity or max(starts) + n_query > self.capacity:
            raise ValueError(
                f"a slot holds {self.capacity} tokens; a call needs {max(keys, max(starts) + n_query)}"
            )
        write = call_positions(starts, n_query, self.device)
        if self.ragged:
            self.bind(lo, write, keys, key_lengths=lengths)
        else:
            self.bind(lo, write, keys, key_mask=key_padding_mask(lengths, keys, self.device))

    def bind(
        self,
        lo: int,
        write: torch.Tensor,
        keys: int,
        *,
        key_mask: torch.Tensor | None = None,
        key_lengths: list[int] | None = None,
    ) -> None:
        """The next call covers slots lo .. lo + len(write) - 1: row i writes its tokens at write[i]
        ((n, n_query) long) and attends to keys 0 .. keys - 1, hidden by key_mask ((n, 1, 1, keys)
        bool) or cut at key_lengths. A call of fixed shapes (a CUDA graph) binds tensors it owns."""
        rows = torch.arange(write.shape[0], device=self.device)[:, None]  # once per call, not per layer
        self._call = (lo, write, keys, rows)
        self.key_mask, self.key_lengths = key_mask, key_lengths

    def finish(self) -> None:
        self._call, self.key_mask, self.key_lengths = None, None, None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._call is not None, "prepare() the call first"
        lo, write, keys, rows = self._call
        n = write.shape[0]
        kb, vb = self.k[layer][lo : lo + n], self.v[layer][lo : lo + n]
        # advanced indices on dims 0 and 2: the assigned value is laid out (n, tokens, heads, e)
        kb[rows, :, write] = k.permute(0, 2, 1, 3)
        vb[rows, :, write] = v.permute(0, 2, 1, 3)
        return kb[:, :, :keys], vb[:, :, :keys]


def call_positions(starts: list[int], n_query: int, device: torch.device) -> torch.Tensor:
    """(n, n_query) long: row i's tokens at starts[i] .. starts[i] + n_query - 1."""
    return host_tensor(starts, device)[:, None] + torch.arange(n_query, device=device)[None]


def key_padding_mask(lengths: list[int], keys: int, device: torch.device) -> torch.Tensor:
    """(n, 1, 1, keys) bool: row i attends to its first lengths[i] keys."""
    return (torch.arange(keys, device=device)[None] < host_tensor(lengths, device)[:, None])[:, None, None]
