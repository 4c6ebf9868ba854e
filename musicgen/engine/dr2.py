"""A DiffRhythm 2 engine that samples every running take in one DiT call per tick (continuous batching).

The block sampler (`musicgen.model.dr2_sampler.sample_blocks`) makes two kinds of calls after the text
pass: an Euler step (`block_size` noisy tokens at time t attending to the text, the clean history and
themselves; nothing kept) and a cache pass (the clean block at time +1, same attention, its keys and
values kept). They differ only in time features and in whether the call's keys and values stay, so
every running row can share one call whatever its block, step, text length, song length, step count
or guidance: each row brings its own time features, positions and style, writes its call tokens after
its own kept tokens in its own cache slot (`SlotCache`), and attends to its own keys only, the padding
up to the longest row being masked.

A take is one sampled row per guidance branch: cond (the lyrics and the style) and, when guided
(cfg_strength >= 1e-5), null (filler tokens of the same length and a zero style), as in sample_blocks.
A row's latents equal sample_blocks' for the same take alone, up to float reassociation (the tests
bound it by 1e-5 in fp32, up to 105 blocks). In bf16 the two differ by bf16 rounding (measured on the
tiny model over 60-105 blocks: up to 0.06 max abs on latents of magnitude ~7, about one bf16 unit;
not tested).

Differences from sample_blocks' call sequence that do not change any latent: a take's last block gets
no cache pass (its keys and values would never be read), and the end of song is checked right after a
block's last Euler step (the cache pass does not change the block), so a take that ends leaves at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from musicgen.engine.cache import SlotCache
from musicgen.errors import GenerationCanceled, InvalidParameter, OutOfMemory
from musicgen.model.dr2_dit import FILLER, DR2DiT, time_features
from musicgen.model.dr2_sampler import BlockSamplerSettings, _eos_end

# (handle, block index, the block's latents (block_size, c)) as soon as a block is sampled
BlockCallback = Callable[["SongHandle", int, torch.Tensor], None]


def cache_bytes_alone(
    text_tokens: int, blocks: int, block_size: int, *, guided: bool, token_bytes: int
) -> int:
    """Key/value cache bytes a take holds alone: per guidance branch, its text and every block."""
    return (2 if guided else 1) * (text_tokens + blocks * block_size) * token_bytes


class SongHandle:
    """A submitted take. `result()` is its (frames, c) latent stream once `done`; frames is
    blocks * block_size unless the end of song cut it (`end`)."""

    def __init__(self, number: int, blocks: int):
        self.number = number
        self.blocks = blocks
        self.blocks_done = 0
        self.done = False
        self.canceled = False
        self.end: int | None = None  # frames kept after the end-of-song cut, when the song ended early
        self._cancel_asked = False
        self._result: torch.Tensor | None = None

    def cancel(self) -> None:
        """Stop sampling this take; it leaves at the engine's next step (its blocks so far are kept)."""
        if not self.done:
            self._cancel_asked = True

    def result(self) -> torch.Tensor:
        if self.canceled:
            raise GenerationCanceled(f"take {self.number} was canceled")
        if not self.done:
            raise RuntimeError(f"take {self.number} is still running: call step() or run_until_idle()")
        assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        state = "canceled" if self.canceled else "done" if self.done else f"{self.blocks_done}/{self.blocks}"
        return f"SongHandle({self.number}, {state})"


class _Take:
    """A take's sampling state: block `blk`, at Euler step `k` (0 .. steps - 2) or at its cache pass
    (k == steps - 1), with the block's current latents `x`."""

    def __init__(self, handle, text, style, noise, settings, on_block, device):
        self.handle, self.text, self.style, self.noise = handle, text, style, noise
        self.settings, self.on_block = settings, on_block
        self.guided = settings.uses_guidance
        self.branches = 2 if self.guided else 1
        self.t_len = text.shape[0]
        self.block_size = noise.shape[1]
        self.need = self.t_len + noise.shape[0] * self.block_size  # tokens per branch
        self.grid = torch.linspace(0, 1, settings.steps, device=device, dtype=torch.float32)
        self.slots: list[int] = []  # cond, then null when guided
        self.blk = 0
        self.k = 0
        self.x: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    @property
    def kept(self) -> int:  # tokens kept in each of its slots: the text and the clean blocks
        return self.t_len + self.blk * self.block_size

    @property
    def at_cache_pass(self) -> bool:
        return self.k == self.settings.steps - 1


class DR2Engine:
    """Running takes of one DR2DiT. `submit` queues a take; `step` admits what fits the memory budget
    (first come, first served), runs the joiners' text pass (one call), then one DiT call over every
    running row, and retires the takes that finished or were canceled."""

    def __init__(
        self,
        model: DR2DiT,
        *,
        device: torch.device | str,
        memory_budget_bytes: int | None = None,
        max_tokens_per_row: int | None = None,
        round_pass_time: bool = True,
    ):
        self.model = model
        self.device = torch.device(device)
        self.dtype = model.dtype
        cfg = model.cfg
        self.block_size = cfg.block_size
        self.memory_budget_bytes = memory_budget_bytes
        self.max_tokens_per_row = max_tokens_per_row
        self.round_pass_time = round_pass_time
        self._pass_dtype = torch.float16 if round_pass_time else None
        self.cache = SlotCache(cfg.depth, cfg.heads, cfg.head_dim, dtype=self.dtype, device=self.device)
        self._waiting: deque[_Take] = deque()
        self._running: list[_Take] = []
        self._owners: list[tuple[_Take, int]] = []  # per active slot: (take, branch 0 cond / 1 null)
        self._features: dict[tuple, torch.Tensor] = {}
        self._submitted = 0
        self.ticks = 0  # step() calls that ran a DiT call
        self.calls = 0  # DiT calls (text passes included)
        self.rows_sampled = 0  # rows over every tick call (rows per tick = rows_sampled / ticks)

    # -- admission -----------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Cache bytes of one token of one row (one guidance branch): depth * 2 * dim * element size."""
        return self.cache.bytes_per_token

    def _capacity_for(self, need: int) -> int:
        return self.max_tokens_per_row if self.max_tokens_per_row is not None else need

    def submit(
        self,
        text_tokens: torch.Tensor,
        style: torch.Tensor,
        noise: torch.Tensor,
        settings: BlockSamplerSettings,
        on_block: BlockCallback | None = None,
    ) -> SongHandle:
        """Queue a take: text (T,) token ids, style (512,), noise (blocks, block_size, c). It joins at
        the next step that has room for it."""
        if text_tokens.ndim != 1 or style.ndim != 1 or noise.ndim != 3:
            raise InvalidParameter(
                f"expected text (T,), style (512,), noise (blocks, bs, c); got {tuple(text_tokens.shape)}, "
                f"{tuple(style.shape)}, {tuple(noise.shape)}"
            )
        if noise.shape[1] != self.block_size or noise.shape[0] < 1:
            raise InvalidParameter(
                f"noise must be (blocks >= 1, {self.block_size}, c), got {tuple(noise.shape)}"
            )
        if settings.round_pass_time != self.round_pass_time:
            raise InvalidParameter(
                f"settings.round_pass_time={settings.round_pass_time} but this engine samples with "
                f"round_pass_time={self.round_pass_time}",
                recovery="use the engine's round_pass_time, or an engine made with yours",
            )
        handle = SongHandle(self._submitted, noise.shape[0])
        take = _Take(handle, text_tokens.to(self.device, torch.long), style.to(self.device, self.dtype),
                     noise, settings, on_block, self.device)  # fmt: skip
        if self.max_tokens_per_row is not None and take.need > self.max_tokens_per_row:
            raise OutOfMemory(
                f"this take needs {take.need} cache tokens per row; the engine holds {self.max_tokens_per_row}",
                recovery="shorten the song or the lyrics, or make the engine with a larger max_tokens_per_row",
            )
        alone = cache_bytes_alone(0, 1, self._capacity_for(take.need), guided=take.guided,
                                  token_bytes=self.bytes_per_token)  # fmt: skip
        if self.memory_budget_bytes is not None and alone > self.memory_budget_bytes:
            raise OutOfMemory(
                f"this take needs {alone} bytes of key/value cache alone; the budget is {self.memory_budget_bytes}",
                recovery="shorten the song or the lyrics, sample it unguided, or raise the memory budget",
            )
        self._submitted += 1
        self._waiting.append(take)
        return handle

    def _admit(self) -> list[_Take]:
        """Admit waiting takes in order while the cache (grown as needed) stays within the budget."""
        joiners: list[_Take] = []
        if self.cache.active == 0 and self.cache.slots:
            self.cache.release()  # an empty engine sizes its buffers for the takes that come now
        slots = self.cache.active
        capacity = self.cache.capacity
        while self._waiting:
            take = self._waiting[0]
            cap = max(capacity, self._capacity_for(take.need))
            budget = self.memory_budget_bytes
            if budget is not None and (slots + take.branches) * cap * self.bytes_per_token > budget:
                break  # first come, first served: later takes wait behind it
            self._waiting.popleft()
            joiners.append(take)
            slots, capacity = slots + take.branches, cap
        if not joiners:
            return joiners
        # slots grow by doubling when more are needed; the budget caps what is allocated (a larger
        # capacity may leave room for fewer slots than are allocated: then fewer are kept)
        alloc = self.cache.slots if slots <= self.cache.slots else max(slots, 2 * self.cache.slots)
        if self.memory_budget_bytes is not None:
            alloc = max(slots, min(alloc, self.memory_budget_bytes // (capacity * self.bytes_per_token)))
        self.cache.resize(alloc, capacity)
        for take in joiners:
            for branch in range(take.branches):
                take.slots.append(self.cache.add())
                self._owners.append((take, branch))
            take.x = take.noise[0].to(self.device, self.dtype)
            self._running.append(take)
        return joiners

    def _retire(self, take: _Take) -> None:
        for slot in sorted(take.slots, reverse=True):  # the highest first: a move never hits a freed slot
            moved = self.cache.free(slot)
            self._owners[slot] = self._owners[-1]
            self._owners.pop()
            if moved is not None:
                owner, branch = self._owners[slot]
                owner.slots[branch] = slot
        take.slots = []
        self._running.remove(take)

    # -- sampling ------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _step_features(self, steps: int, k: int, grid: torch.Tensor) -> torch.Tensor:
        """(bs, 256) time features of Euler step k, computed as sample_blocks computes them for one row."""
        key = ("step", steps, k)
        if key not in self._features:
            self._features[key] = time_features(grid[k].expand(1, self.block_size))[0].float()
        return self._features[key]

    def _pass_features(self) -> torch.Tensor:
        if "pass" not in self._features:
            ones = torch.ones(1, self.block_size, device=self.device)
            self._features["pass"] = time_features(ones, self._pass_dtype)[0].float()
        return self._features["pass"]

    def _text_pass(self, joiners: list[_Take]) -> None:
        takes = [t for t in joiners if t.t_len]
        if not takes:
            return
        lo = min(s for t in joiners for s in t.slots)
        owners = self._owners[lo:]
        width = max(t.t_len for t in takes)
        tokens = torch.full((len(owners), width), FILLER, dtype=torch.long, device=self.device)
        for i, (take, branch) in enumerate(owners):
            if branch == 0:
                tokens[i, : take.t_len] = take.text
        # a take without text attends to one padded key (its outputs are dropped; its keys stay finite)
        lengths = torch.tensor([max(t.t_len, 1) for t, _ in owners], device=self.device)
        rows = len(owners)
        features = time_features(torch.full((rows, width), -1.0, device=self.device), self._pass_dtype)
        positions = torch.arange(width, device=self.device)[None].repeat(rows, 1)
        style = torch.stack([t.style if b == 0 else torch.zeros_like(t.style) for t, b in owners])
        self.cache.prepare(lo, torch.zeros(rows, dtype=torch.long, device=self.device), width, lengths)
        try:
            self.model(self.model.text_embed(tokens), features, positions, style, self.cache)
        finally:
            self.cache.finish()
        self.calls += 1

    def _tick(self) -> list[tuple[_Take, int, torch.Tensor]]:
        """One DiT call over every active slot; returns the blocks that became final."""
        owners = self._owners
        bs = self.block_size
        latents = torch.stack([t.x for t, _ in owners])
        features = torch.stack([
            self._pass_features() if t.at_cache_pass else self._step_features(t.settings.steps, t.k, t.grid)
            for t, _ in owners
        ])  # fmt: skip
        starts = torch.tensor([t.kept for t, _ in owners], device=self.device)
        positions = (starts - torch.tensor([t.t_len for t, _ in owners], device=self.device))[:, None]
        positions = positions + torch.arange(bs, device=self.device)[None]
        style = torch.stack([t.style if b == 0 else torch.zeros_like(t.style) for t, b in owners])
        self.cache.prepare(0, starts, bs, starts + bs)
        try:
            out = self.model(self.model.latent_embed(latents), features, positions, style, self.cache)
        finally:
            self.cache.finish()
        self.calls += 1
        self.ticks += 1
        self.rows_sampled += len(owners)
        final: list[tuple[_Take, int, torch.Tensor]] = []
        for take in list(self._running):
            if take.at_cache_pass:  # its clean block's keys and values are kept: on to the next block
                take.blk += 1
                take.k = 0
                take.x = take.noise[take.blk].to(self.device, self.dtype)
                continue
            v = out[take.slots[0]]
            if take.guided:
                v = v + (v - out[take.slots[1]]) * take.settings.cfg_strength
            grid, k = take.grid, take.k
            take.x = take.x + (grid[k + 1] - grid[k]) * v
            take.k += 1
            if take.at_cache_pass:
                final.append((take, take.blk, take.x))
        return final

    def _finish_block(self, take: _Take, blk: int, x: torch.Tensor) -> None:
        take.out.append(x)
        take.handle.blocks_done = blk + 1
        stream = torch.cat(take.out) if len(take.out) > 1 else x
        end = _eos_end(stream)
        if end is not None or blk + 1 == take.noise.shape[0]:
            take.handle.end = end
            take.handle._result = stream[:end] if end is not None else stream
            take.handle.done = True
            self._retire(take)

    def step(self) -> bool:
        """Admit, sample one tick, retire, then call the on_block callbacks of the blocks that became
        final (the engine is consistent by then; a callback that raises ends step() there, and the
        callbacks after it in this tick are not called). False when there was nothing to sample. If
        the model raises (out of memory, say), step() raises with no take changed and may be called
        again."""
        for take in [t for t in self._running if t.handle._cancel_asked]:
            take.handle.canceled = True
            self._retire(take)
        for take in [t for t in self._waiting if t.handle._cancel_asked]:
            take.handle.canceled = True
            self._waiting.remove(take)
        joiners = self._admit()
        if not self._running:
            return False
        with torch.inference_mode():
            try:
                self._text_pass(joiners)
            except BaseException:
                for take in reversed(joiners):  # back at the head of the queue, in order: step() may retry
                    self._retire(take)
                    take.blk = take.k = 0
                    self._waiting.appendleft(take)
                raise
            # a failed tick changes no take: what it wrote lies past every row's kept tokens, or (a
            # cache pass) is written again when the tick is retried
            final = self._tick()
        for take, blk, x in final:
            self._finish_block(take, blk, x)
        if self.idle:
            self.cache.release()
        for take, blk, x in final:  # after the engine's state is whole again
            if take.on_block is not None:
                take.on_block(take.handle, blk, x)
        return True

    def run_until_idle(self, max_ticks: int | None = None) -> int:
        """Step until no take runs or waits (or max_ticks ticks); returns the ticks run."""
        ticks = 0
        while not self.idle and (max_ticks is None or ticks < max_ticks):
            if not self.step():
                if self._waiting:  # nothing running and the head of the queue does not fit: cannot happen
                    raise RuntimeError("the waiting take does not fit an empty engine")
                break
            ticks += 1
        return ticks
