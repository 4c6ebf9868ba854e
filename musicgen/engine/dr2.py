"""A DiffRhythm 2 engine that samples every running take in one DiT call per tick (continuous batching).

The block sampler (`musicgen.model.dr2_sampler.sample_blocks`) makes two kinds of calls after the text
pass: an Euler step (`block_size` noisy tokens at time t attending to the text, the clean history and
themselves; nothing kept) and a cache pass (the clean block at time +1, same attention, its keys and
values kept). They differ only in time features and in whether the call's keys and values stay, so
every running row can share one call whatever its block, step, text length, song length, step count
or guidance: each row brings its own time features, positions and style, writes its call tokens after
its own kept tokens in its own cache slot (`SlotCache`), and attends to its own keys only: on CUDA one
fused attention call with the padding up to the longest row masked, on the CPU one call per row over
its own keys (there the masked kernel computes every padded key). The Euler steps of every take then
run as one batched update. Joiners' text passes run before the tick, takes of similar text lengths
sharing a call (padding within TEXT_PADDING of their own tokens).

With `graphs`, every tick has fixed shapes: rows padded to a power of two (the slots are allocated in
powers of two), keys to the cache's capacity under the mask; on CUDA each such tick is a CUDA graph,
captured at its first use and replayed while the cache keeps its buffers (one per row-count bucket
and cache generation). It is the `graphs` plan's engine, experimental: not yet measured on a GPU.

A take is one sampled row per guidance branch: cond (the lyrics and the style) and, when guided
(cfg_strength >= 1e-5), null (filler tokens of the same length and a zero style), as in sample_blocks.
A row's latents equal sample_blocks' for the same take alone, up to float reassociation (the tests
bound it by 1e-5 in fp32, up to 105 blocks, fixed-shape ticks too). In bf16 on the CPU (measured on
the tiny model, 60-105 blocks, mixed text lengths, steps and guidance; not tested) the per-row engine
equals sample_blocks bit for bit, and fixed-shape ticks differ by bf16 rounding (up to 0.09 max abs
on latents of magnitude ~8, about one bf16 unit), as the masked attention over padded keys did before.

Differences from sample_blocks' call sequence that do not change any latent: a take's last block gets
no cache pass (its keys and values would never be read), and the end of song is checked right after a
block's last Euler step (the cache pass does not change the block), so a take that ends leaves at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from musicgen.engine.cache import SlotCache, call_positions, key_padding_mask
from musicgen.errors import GenerationCanceled, InvalidParameter, OutOfMemory
from musicgen.model.dr2_dit import COND_DIM, FILLER, TIME_FEATURES, DR2DiT, time_features
from musicgen.model.dr2_sampler import EOS_MSE, BlockSamplerSettings, _eos_end
from musicgen.runtime.device import host_tensor
from musicgen.runtime.graphs import GraphedCall

# a text-pass call pads its takes to its longest text: at most this many times their own tokens
TEXT_PADDING = 1.25

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
        # the Euler steps' dt, read once (the grid's fp32 numbers on this device, as sample_blocks has them)
        self.dts: list[float] = (self.grid[1:] - self.grid[:-1]).tolist()
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
    (first come, first served), runs the joiners' text passes (takes of similar text lengths share a
    call), then one DiT call over every running row, and retires the takes that finished or were
    canceled. `graphs`: fixed-shape ticks, CUDA graphs on CUDA (see the module's docstring)."""

    def __init__(
        self,
        model: DR2DiT,
        *,
        device: torch.device | str,
        memory_budget_bytes: int | None = None,
        max_tokens_per_row: int | None = None,
        round_pass_time: bool = True,
        graphs: bool = False,
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
        self.graphs = graphs
        # fixed-shape ticks attend with the key-padding mask (one shape per bucket)
        self.cache = SlotCache(cfg.depth, cfg.heads, cfg.head_dim, dtype=self.dtype, device=self.device,
                               ragged=False if graphs else None)  # fmt: skip
        self._fixed: dict[tuple[int, int], _FixedTick] = {}  # (cache generation, rows) -> its tick
        self._waiting: deque[_Take] = deque()
        self._running: list[_Take] = []
        self._owners: list[tuple[_Take, int]] = []  # per active slot: (take, branch 0 cond / 1 null)
        self._features: dict[tuple, torch.Tensor] = {}
        self._submitted = 0
        self.ticks = 0  # step() calls that ran a DiT call
        self.calls = 0  # DiT calls (text passes included)
        self.rows_sampled = 0  # rows over every tick call (rows per tick = rows_sampled / ticks)
        self.captures = 0  # fixed-shape ticks made (CUDA graphs captured, on CUDA)

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
        if self.graphs:
            alloc = _bucket(alloc)  # a fixed-shape tick pads its rows to a power of two
        if self.memory_budget_bytes is not None:
            alloc = max(slots, min(alloc, self.memory_budget_bytes // (capacity * self.bytes_per_token)))
        self.cache.resize(alloc, capacity)
        # slots by text length, longest first, so that the text pass groups takes of similar lengths
        for take in sorted(joiners, key=lambda t: -t.t_len):
            for branch in range(take.branches):
                take.slots.append(self.cache.add())
                self._owners.append((take, branch))
            take.noise = take.noise.to(self.device, self.dtype)  # one copy; each block's is a view
            take.x = take.noise[0]
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
        """The joiners' text passes: takes by slot (text length, longest first), in groups whose padding
        to the group's longest text stays within TEXT_PADDING of their own tokens, one call per group.
        A take without text has none (its first tick writes its first block at position 0)."""
        takes = sorted((t for t in joiners if t.t_len), key=lambda t: t.slots[0])
        groups: list[list[_Take]] = []
        for take in takes:
            group = groups[-1] if groups else []
            rows = sum(t.branches for t in group) + take.branches
            own = sum(t.t_len * t.branches for t in group) + take.t_len * take.branches
            if group and group[0].t_len * rows <= TEXT_PADDING * own:
                group.append(take)
            else:
                groups.append([take])
        for group in groups:
            self._text_call(group)

    def _text_call(self, group: list[_Take]) -> None:
        lo = group[0].slots[0]
        owners = self._owners[lo : lo + sum(t.branches for t in group)]
        width = group[0].t_len
        tokens = torch.full((len(owners), width), FILLER, dtype=torch.long, device=self.device)
        for i, (take, branch) in enumerate(owners):
            if branch == 0:
                tokens[i, : take.t_len] = take.text
        lengths = [t.t_len for t, _ in owners]
        rows = len(owners)
        features = time_features(torch.full((rows, width), -1.0, device=self.device), self._pass_dtype)
        positions = torch.arange(width, device=self.device)[None].repeat(rows, 1)
        style = torch.stack([t.style if b == 0 else torch.zeros_like(t.style) for t, b in owners])
        self.cache.prepare(lo, [0] * rows, width, lengths)
        try:
            self.model(self.model.text_embed(tokens), features, positions, style, self.cache)
        finally:
            self.cache.finish()
        self.calls += 1

    def _tick(self) -> list[tuple[_Take, int, torch.Tensor]]:
        """One DiT call over every active slot, then the Euler steps of every take not at its cache
        pass in one batched update; returns the blocks that became final."""
        owners = self._owners
        bs, n = self.block_size, len(owners)
        latents = torch.stack([t.x for t, _ in owners])
        features = torch.stack([
            self._pass_features() if t.at_cache_pass else self._step_features(t.settings.steps, t.k, t.grid)
            for t, _ in owners
        ])  # fmt: skip
        starts = [t.kept for t, _ in owners]
        positions = host_tensor([t.kept - t.t_len for t, _ in owners], self.device)[:, None]
        positions = positions + torch.arange(bs, device=self.device)[None]
        style = torch.stack([t.style if b == 0 else torch.zeros_like(t.style) for t, b in owners])
        if self.graphs:
            out = self._fixed_tick(n)(latents, features, positions, style, starts)
        else:
            self.cache.prepare(0, starts, bs, [s + bs for s in starts])
            try:
                out = self.model(self.model.latent_embed(latents), features, positions, style, self.cache)
            finally:
                self.cache.finish()
        self.calls += 1
        self.ticks += 1
        self.rows_sampled += n
        stepping = [t for t in self._running if not t.at_cache_pass]
        if stepping:
            x = self._euler(stepping, out)
        final: list[tuple[_Take, int, torch.Tensor]] = []
        for take in self._running:
            if take.at_cache_pass:  # its clean block's keys and values are kept: on to the next block
                take.blk += 1
                take.k = 0
                take.x = take.noise[take.blk]
        for i, take in enumerate(stepping):
            take.x = x[i]
            take.k += 1
            if take.at_cache_pass:
                take.x = take.x.clone()  # kept as the block's latents: not a view of the whole batch
                final.append((take, take.blk, take.x))
        return final

    def _euler(self, takes: list[_Take], out: torch.Tensor) -> torch.Tensor:
        """(len(takes), bs, c): each take's next latents, x + dt * (v + (v - v_null) * cfg), in one batched
        update with each take's own dt and cfg, in sample_blocks' arithmetic per take: its cfg is a
        Python float (the product in fp32, rounded to the model's dtype) and its dt a 0-dim fp32 tensor
        (cast to the model's dtype first: checked bit for bit in bf16 on the CPU); an unguided take
        reads its cond row twice with cfg 0 (v + 0 = v)."""
        dev = self.device
        cond = host_tensor([t.slots[0] for t in takes], dev)
        null = host_tensor([t.slots[-1] for t in takes], dev)
        cfg = host_tensor([t.settings.cfg_strength if t.guided else 0.0 for t in takes], dev, torch.float32)
        dt = host_tensor([t.dts[t.k] for t in takes], dev, torch.float32)
        v = out[cond]
        v = v + ((v - out[null]).float() * cfg[:, None, None]).to(v.dtype)
        x = torch.stack([t.x for t in takes])
        return x + dt.to(x.dtype)[:, None, None] * v

    def _fixed_tick(self, n: int) -> _FixedTick:
        """The fixed-shape tick for n rows: its bucket's, made (captured, on CUDA) at first use in this
        cache generation; those of earlier generations are dropped (they read freed buffers)."""
        rows = min(_bucket(n), self.cache.slots)
        key = (self.cache.generation, rows)
        if key not in self._fixed:
            self._fixed = {k: v for k, v in self._fixed.items() if k[0] == self.cache.generation}
            self._fixed[key] = _FixedTick(self.model, self.cache, rows)
            self.captures += 1
        return self._fixed[key]

    def _may_end(self, final: list[tuple[_Take, int, torch.Tensor]]) -> list[bool]:
        """Per final block, whether its last frame is near enough the end marker for the official check
        (`_eos_end`) to be worth running: one read from the device for the whole tick, where the check
        itself reads once per block. The margin covers the rounding of an MSE in the model's dtype."""
        if not final:
            return []
        last = torch.stack([x[-1] for _, _, x in final]).float()
        return [m <= EOS_MSE + 0.01 for m in ((last - 1) ** 2).mean(-1).tolist()]

    def _finish_block(self, take: _Take, blk: int, x: torch.Tensor, may_end: bool) -> None:
        take.out.append(x)
        take.handle.blocks_done = blk + 1
        last = blk + 1 == take.noise.shape[0]
        if not (may_end or last):
            return
        stream = torch.cat(take.out) if len(take.out) > 1 else x
        end = _eos_end(stream) if may_end else None
        if end is not None or last:
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
                    take.x = None
                    self._waiting.appendleft(take)
                raise
            # a failed tick changes no take: what it wrote lies past every row's kept tokens, or (a
            # cache pass) is written again when the tick is retried
            final = self._tick()
        for (take, blk, x), may_end in zip(final, self._may_end(final), strict=True):
            self._finish_block(take, blk, x, may_end)
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


def _bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


class _FixedTick:
    """A tick over `rows` slots (0 .. rows - 1) of fixed shapes: every row writes block_size tokens and
    attends to the cache's whole capacity under a key-padding mask. A call with fewer rows fills the
    first ones; the rest keep what an earlier call left (zeros at first), which only ever writes into
    free slots (the active rows are always the first) and is never read. On CUDA the model call is one
    CUDA graph, captured at the first call on its inputs (warmed up on a side stream first: that run
    writes the keys and values the replay writes again); elsewhere it runs eagerly (the same
    arithmetic: what the tests check on the CPU). Valid while the cache keeps its buffers."""

    def __init__(self, model: DR2DiT, cache: SlotCache, rows: int):
        self.model, self.cache, self.rows = model, cache, rows
        dev, bs, dim = cache.device, model.cfg.block_size, model.cfg.mel_dim
        self.latents = torch.zeros(rows, bs, dim, device=dev, dtype=model.dtype)
        self.features = torch.zeros(rows, bs, TIME_FEATURES, device=dev)
        self.positions = torch.arange(bs, device=dev)[None].repeat(rows, 1)
        self.style = torch.zeros(rows, COND_DIM, device=dev, dtype=model.dtype)
        self.write = call_positions([0] * rows, bs, dev)
        self.mask = key_padding_mask([bs] * rows, cache.capacity, dev)
        self.graph: GraphedCall | None = None

    def _forward(self) -> torch.Tensor:
        self.cache.bind(0, self.write, self.cache.capacity, key_mask=self.mask)
        try:
            x = self.model.latent_embed(self.latents)
            return self.model(x, self.features, self.positions, self.style, self.cache)
        finally:
            self.cache.finish()

    def __call__(self, latents, features, positions, style, starts: list[int]) -> torch.Tensor:
        n, bs = len(starts), self.model.cfg.block_size
        if max(starts) + bs > self.cache.capacity:
            raise ValueError(f"a slot holds {self.cache.capacity} tokens; a call needs {max(starts) + bs}")
        self.latents[:n].copy_(latents)
        self.features[:n].copy_(features)
        self.positions[:n].copy_(positions)
        self.style[:n].copy_(style)
        self.write[:n].copy_(call_positions(starts, bs, self.cache.device))
        self.mask[:n].copy_(
            key_padding_mask([s + bs for s in starts], self.cache.capacity, self.cache.device)
        )
        if self.cache.device.type != "cuda":
            return self._forward()[:n]
        if self.graph is None:
            # captured on this call's inputs: the warm-up run writes what the replay then writes again
            self.graph = GraphedCall(self._forward, warm_up=True)
        return self.graph()[:n]
