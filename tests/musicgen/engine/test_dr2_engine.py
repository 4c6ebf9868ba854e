"""DR2Engine on the tiny DiffRhythm 2 (musicgen.tiny, loaded from its official files), fp32 on the CPU:
every take's latents within 1e-5 (max abs) of the same take sampled alone by sample_blocks, with mixed
lyrics lengths (none included), block counts, step counts and guidance (cfg 0 included); takes that
join after a few ticks or are canceled mid-way; a 210 s take; the end-of-song cut; on_block; admission
under a memory budget (first come, first served) and the takes refused at submit; a failed model call
(retried); the slot cache's compaction and growth.

The tiny model's random weights never reach the end-of-song marker by themselves, so the end of song
is tested on a crafted case: the same model with its output projection scaled by 1e-3 (velocities
near zero, so a block stays near its noise) and noise of all ones from a chosen block on. sample_blocks
cuts those takes too (asserted), and the engine must cut them at the same frame and retire them then."""

from __future__ import annotations

import pytest
import torch

from musicgen.engine import DR2Engine, SlotCache
from musicgen.errors import GenerationCanceled, InvalidParameter, OutOfMemory
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, sample_blocks

BS = 10  # the tiny model's block size
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from musicgen.tiny import save_tiny_dr2

    return save_tiny_dr2(tmp_path_factory.mktemp("tiny-dr2"))


@pytest.fixture(scope="module")
def model(folder):
    from musicgen.model.loading import load_dr2

    return load_dr2(folder, device=torch.device("cpu")).eval()


@pytest.fixture(scope="module")
def quiet_model(folder):
    """The tiny model with velocities scaled down 1000x: a block ends near its noise."""
    from musicgen.model.loading import load_dr2

    m = load_dr2(folder, device=torch.device("cpu")).eval()
    with torch.no_grad():
        m.proj_out.weight.mul_(1e-3)
        m.proj_out.bias.mul_(1e-3)
    return m


def take(seed, t_len, blocks, steps=4, cfg=2.0, ones_from=None):
    g = torch.Generator().manual_seed(1000 + seed)
    text = torch.randint(1, 364, (t_len,), generator=g)
    style = torch.randn(512, generator=g)
    noise = block_noise(seed, blocks, BS)
    if ones_from is not None:
        noise[ones_from:] = 1.0
    return text, style, noise, BlockSamplerSettings(steps=steps, cfg_strength=cfg)


def alone(model, t):
    text, style, noise, settings = t
    return sample_blocks(model, text[None], style[None], noise[None], settings)[0]


def assert_close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


MIXED = [  # (seed, text length, blocks, steps, cfg)
    (1, 37, 3, 4, 2.0),
    (2, 0, 2, 3, 2.0),
    (3, 120, 4, 5, 0.0),
    (4, 8, 1, 2, 1.5),
    (5, 60, 5, 3, 0.0),
    (6, 15, 2, 6, 3.0),
]


def test_mixed_takes_in_one_call_per_tick_equal_takes_alone(model):
    engine = DR2Engine(model, device="cpu")
    takes = [take(s, n, b, steps, cfg) for s, n, b, steps, cfg in MIXED]
    handles = [engine.submit(*t) for t in takes]
    engine.step()
    rows = sum(2 if cfg else 1 for *_, cfg in MIXED)
    # text lengths 120, 60, 37, 15, 8 are too far apart to share a text pass; the take without text has none
    text_calls = 5
    assert engine.ticks == 1 and engine.calls == text_calls + 1 and engine.rows_sampled == rows
    ticks = 1 + engine.run_until_idle()
    # the longest take in ticks: blocks * (steps - 1) Euler steps and a cache pass per block but the last
    assert ticks == max(b * (steps - 1) + b - 1 for _, _, b, steps, _ in MIXED) == engine.ticks
    assert engine.calls == ticks + text_calls and engine.idle and engine.cache.active == 0
    for h, t, (_, _, blocks, _, _) in zip(handles, takes, MIXED, strict=True):
        assert h.done and h.end is None and h.blocks_done == blocks
        assert_close(h.result(), alone(model, t))


def test_joiners_of_similar_text_lengths_share_a_text_pass(model):
    """Texts of 100, 96 and 90 tokens pad to 100 in one call (within TEXT_PADDING of their own); 30
    and 29 share another; each take still equals it alone, whatever the order they came in."""
    engine = DR2Engine(model, device="cpu")
    takes = [take(20 + i, n, 2) for i, n in enumerate([30, 96, 100, 29, 90])]
    handles = [engine.submit(*t) for t in takes]
    engine.step()
    assert engine.calls == 2 + 1 and engine.ticks == 1
    engine.run_until_idle()
    for h, t in zip(handles, takes, strict=True):
        assert_close(h.result(), alone(model, t))


def test_the_fused_masked_attention_equals_the_per_row_one(model):
    """A cache that gives a key-padding mask (the CUDA path: one fused call) samples what the CPU's
    per-row attention samples."""
    takes = [take(30 + i, n, b, steps) for i, (n, b, steps) in enumerate([(50, 3, 4), (7, 2, 3), (0, 2, 5)])]
    results = []
    for ragged in (True, False):
        engine = DR2Engine(model, device="cpu")
        engine.cache.ragged = ragged
        handles = [engine.submit(*t) for t in takes]
        engine.run_until_idle()
        results.append([h.result() for h in handles])
    for a, b in zip(*results, strict=True):
        assert_close(a, b)


def test_a_take_submitted_after_a_few_ticks_equals_it_alone(model):
    engine = DR2Engine(model, device="cpu")
    first = [take(11, 30, 3), take(12, 5, 4, steps=3, cfg=0.0)]
    handles = [engine.submit(*t) for t in first]
    for _ in range(4):
        engine.step()
    late = take(13, 90, 2, steps=5)
    handles.append(engine.submit(*late))
    assert engine.waiting == 1
    engine.step()
    assert engine.waiting == 0 and engine.running == 3
    engine.run_until_idle()
    for h, t in zip(handles, [*first, late], strict=True):
        assert_close(h.result(), alone(model, t))


def test_a_canceled_take_leaves_and_the_others_are_unaffected(model):
    engine = DR2Engine(model, device="cpu")
    takes = [take(21, 25, 4), take(22, 50, 3, cfg=0.0), take(23, 10, 4, steps=5)]
    handles = [engine.submit(*t) for t in takes]
    for _ in range(5):
        engine.step()
    assert engine.cache.active == 5
    handles[0].cancel()  # its slots are the first: the last rows move into them
    engine.step()
    assert handles[0].canceled and engine.running == 2 and engine.cache.active == 3
    with pytest.raises(GenerationCanceled):
        handles[0].result()
    engine.run_until_idle()
    for h, t in zip(handles[1:], takes[1:], strict=True):
        assert_close(h.result(), alone(model, t))
    waiting = engine.submit(*take(24, 5, 1))
    waiting.cancel()  # canceled before it joined
    assert engine.run_until_idle() == 0 and waiting.canceled and engine.idle


def test_the_end_of_song_cut_is_the_samplers(quiet_model):
    engine = DR2Engine(quiet_model, device="cpu")
    takes = [take(31, 20, 5, ones_from=2), take(32, 40, 5, cfg=0.0, ones_from=3), take(33, 12, 3)]
    handles = [engine.submit(*t) for t in takes]
    engine.run_until_idle()
    for h, t, ended_at in zip(handles, takes, [2, 3, None], strict=True):
        want = alone(quiet_model, t)
        assert_close(h.result(), want)
        if ended_at is None:
            assert h.end is None and want.shape[0] == t[2].shape[0] * BS
        else:  # the sampler stopped after the first block of ones, cutting it and one frame before it
            assert want.shape[0] == ended_at * BS - 1 == h.end
            assert h.blocks_done == ended_at + 1 < h.blocks


def test_on_block_delivers_each_block_in_order_as_soon_as_it_is_final(model):
    engine = DR2Engine(model, device="cpu")
    seen: list[tuple[int, int, int, torch.Tensor]] = []

    def on_block(handle, index, latents):
        seen.append((handle.number, index, engine.ticks, latents.clone()))

    takes = [take(41, 20, 3, steps=4), take(42, 7, 2, steps=2, cfg=0.0)]
    handles = [engine.submit(*t, on_block=on_block) for t in takes]
    engine.run_until_idle()
    for h in handles:
        mine = [s for s in seen if s[0] == h.number]
        assert [s[1] for s in mine] == list(range(h.blocks))
        assert torch.equal(torch.cat([s[3] for s in mine]), h.result())
    # a block is final after its steps - 1 Euler steps and the cache passes of the blocks before it
    assert [(n, i, tick) for n, i, tick, _ in seen] == [
        (1, 0, 1),
        (0, 0, 3),
        (1, 1, 3),
        (0, 1, 7),
        (0, 2, 11),
    ]


def test_over_budget_takes_wait_in_order(model):
    need = 40 + 2 * BS  # tokens per row of the takes below
    bpt = model.cfg.depth * 2 * model.cfg.dim * 4
    engine = DR2Engine(model, device="cpu", memory_budget_bytes=5 * need * bpt, max_tokens_per_row=need)
    assert engine.bytes_per_token == bpt
    takes = [
        take(51, 40, 2, steps=3),  # 2 slots
        take(52, 30, 2, steps=4),  # 2 slots
        take(53, 20, 1, steps=4),  # 2 slots: does not fit beside the first two
        take(54, 10, 1, steps=3, cfg=0.0),  # 1 slot: would fit, but waits behind the third
    ]
    handles = [engine.submit(*t) for t in takes]
    order = []
    while not engine.idle:
        engine.step()
        assert engine.cache.nbytes() <= engine.memory_budget_bytes
        order.append((engine.running, engine.waiting))
    assert order[0] == (2, 2)
    # the first take finishes after 2 blocks of 2 steps and a cache pass (tick 5): then both others join
    assert order[4] == (1, 2) and order[5] == (3, 0)
    for h, t in zip(handles, takes, strict=True):
        assert_close(h.result(), alone(model, t))


def test_a_take_too_big_for_the_engine_is_refused_at_submit(model):
    bpt = model.cfg.depth * 2 * model.cfg.dim * 4
    need = 100 + 3 * BS
    engine = DR2Engine(model, device="cpu", memory_budget_bytes=2 * need * bpt - 1)
    with pytest.raises(OutOfMemory) as err:
        engine.submit(*take(61, 100, 3))  # guided: two rows of `need` tokens
    assert err.value.recovery and "budget" in err.value.recovery
    assert engine.idle
    h = engine.submit(*take(61, 100, 3, cfg=0.0))  # unguided it fits: one row
    engine.run_until_idle()
    assert h.done
    small = DR2Engine(model, device="cpu", max_tokens_per_row=need - 1)
    with pytest.raises(OutOfMemory, match="max_tokens_per_row|holds"):
        small.submit(*take(62, 100, 3, cfg=0.0))


def test_submit_checks_shapes_and_the_pass_time_rounding(model):
    engine = DR2Engine(model, device="cpu")
    text, style, noise, settings = take(71, 10, 2)
    with pytest.raises(InvalidParameter):
        engine.submit(text, style, noise[:, :5], settings)
    with pytest.raises(InvalidParameter):
        engine.submit(text[None], style, noise, settings)
    with pytest.raises(InvalidParameter, match="round_pass_time"):
        engine.submit(text, style, noise, BlockSamplerSettings(steps=4, round_pass_time=False))
    fp32 = DR2Engine(model, device="cpu", round_pass_time=False)
    t = (text, style, noise, BlockSamplerSettings(steps=4, round_pass_time=False))
    h = fp32.submit(*t)
    fp32.run_until_idle()
    assert_close(h.result(), alone(model, t))


def test_the_slot_cache_keeps_active_rows_first():
    cache = SlotCache(depth=1, heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    cache.resize(4, 3)
    for i in range(4):
        assert cache.add() == i
        cache.k[0][i] = i
    assert cache.free(1) == 3 and cache.active == 3  # the last row moved into the freed slot
    assert [cache.k[0][s, 0, 0, 0].item() for s in range(3)] == [0, 3, 2]
    assert cache.free(2) is None and cache.active == 2
    cache.resize(4, 6)  # grown: the active rows are kept
    assert cache.k[0].shape == (4, 1, 6, 2) and cache.k[0][1, 0, :3].eq(3).all()
    assert cache.nbytes() == 4 * 6 * cache.bytes_per_token == 4 * 6 * 2 * 2 * 4
    cache.resize(2, 6)  # unused slots can be given back, active ones cannot
    with pytest.raises(ValueError):
        cache.resize(1, 6)


def test_takes_joining_one_by_one_grow_the_cache_by_doubling_only_when_needed(model):
    engine = DR2Engine(model, device="cpu")
    most = 0
    for i in range(6):
        engine.submit(*take(90 + i, 20, 6, steps=3))
        engine.step()
        engine.step()
        most = max(most, engine.cache.active)
        assert engine.cache.slots <= 2 * most and engine.cache.capacity == 20 + 6 * BS
    assert engine.cache.slots == 16 and most == 12  # 2, 4, 8, 16 slots, never more


def test_a_failed_call_changes_no_take_and_step_can_be_retried(model, monkeypatch):
    engine = DR2Engine(model, device="cpu")
    takes = [take(81, 30, 2), take(82, 12, 3, cfg=0.0), take(83, 44, 2, steps=3)]
    handles = [engine.submit(*t) for t in takes[:2]]
    for _ in range(3):
        engine.step()
    handles.append(engine.submit(*takes[2]))
    forward, calls = model.forward, []

    def failing(*a, **kw):  # the first call fails (the text pass), then the second (a tick)
        calls.append(1)
        if len(calls) in (1, 3):
            raise RuntimeError("out of memory (simulated)")
        return forward(*a, **kw)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    assert engine.waiting == 1 and engine.running == 2 and engine.cache.active == 3
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()  # the text pass ran, the tick failed
    monkeypatch.undo()
    engine.run_until_idle()
    for h, t in zip(handles, takes, strict=True):
        assert_close(h.result(), alone(model, t))


def test_a_full_length_song_beside_a_short_one_equals_it_alone(model):
    """210 s (105 blocks) with 400 lyrics tokens: the rounding differences do not grow past 1e-5."""
    engine = DR2Engine(model, device="cpu")
    takes = [take(101, 400, 105, steps=3), take(102, 50, 15, steps=4, cfg=0.0)]
    handles = [engine.submit(*t) for t in takes]
    engine.run_until_idle()
    for h, t in zip(handles, takes, strict=True):
        assert_close(h.result(), alone(model, t))


def test_fixed_shape_ticks_equal_takes_alone(model):
    """graphs=True: every tick over a power-of-two bucket of rows (the rows past the active ones left
    as an earlier tick left them) and the cache's whole capacity under a key-padding mask; on CUDA each
    bucket's tick is a CUDA graph, on the CPU it runs eagerly. Takes joining, leaving and the cache
    growing change the bucket; each take still equals it alone, and one tick is made per bucket and
    cache generation."""
    engine = DR2Engine(model, device="cpu", graphs=True)
    takes = [take(s, n, b, steps, cfg) for s, n, b, steps, cfg in MIXED]
    handles = [engine.submit(*t) for t in takes[:2]]  # 4 rows
    engine.step()
    assert engine.cache.slots == 4 and engine.captures == 1
    for _ in range(3):
        engine.step()
    assert engine.captures == 1  # the same bucket and buffers: made once
    handles += [engine.submit(*t) for t in takes[2:]]  # 4 + 1 + 2 + 1 + 2 rows: 16 slots
    engine.step()
    assert engine.cache.slots == 16 and engine.captures == 2
    handles[4].cancel()  # 5 blocks: still running
    engine.run_until_idle()
    assert engine.captures > 2  # buckets of 8, then 4 and fewer, as takes leave
    for i, (h, t) in enumerate(zip(handles, takes, strict=True)):
        if i == 4:
            assert h.canceled
        else:
            assert_close(h.result(), alone(model, t))


def test_fixed_shape_ticks_of_a_long_take_beside_short_ones(model):
    """Keys padded to a capacity of 400 + 40 blocks while the short takes attend to a few dozen."""
    engine = DR2Engine(model, device="cpu", graphs=True)
    takes = [take(111, 400, 40, steps=3), take(112, 5, 3, steps=4), take(113, 0, 6, steps=2, cfg=0.0)]
    handles = [engine.submit(*t) for t in takes]
    engine.run_until_idle()
    for h, t in zip(handles, takes, strict=True):
        assert_close(h.result(), alone(model, t))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_ticks_equal_takes_alone(folder):
    """On CUDA in fp32 (TF32 off): ticks replayed from CUDA graphs, takes joining and leaving between
    them, equal each take alone (1e-4: CUDA's kernels differ by row count more than the CPU's)."""
    from musicgen.model.loading import load_dr2

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda = load_dr2(folder, device=torch.device("cuda")).eval()
        engine = DR2Engine(cuda, device="cuda", graphs=True)
        takes = [take(s, n, b, steps, cfg) for s, n, b, steps, cfg in MIXED]
        handles = [engine.submit(*t) for t in takes[:3]]
        for _ in range(4):
            engine.step()
        handles += [engine.submit(*t) for t in takes[3:]]
        engine.run_until_idle()
        assert engine.captures >= 2
        for h, (text, style, noise, settings) in zip(handles, takes, strict=True):
            want = sample_blocks(cuda, text[None].cuda(), style[None].cuda(), noise[None].cuda(), settings)[0]
            assert (h.result() - want).abs().max().item() <= 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
