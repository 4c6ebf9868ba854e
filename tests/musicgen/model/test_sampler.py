"""Contracts of the optimised sampler: it computes what the official algorithm computes."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from musicgen.errors import GenerationCanceled
from musicgen.model.dit import DiT, DiTConfig
from musicgen.model.sampler import (
    SamplerSettings,
    SongConditions,
    sample,
    sample_many,
    sample_reference,
    take_noise,
)
from musicgen.registry import DR1
from musicgen.runtime.plans import ExecutionPlan
from musicgen.runtime.projections import fuse, unfuse
from musicgen.runtime.workers import RowWorkers

FRAMES = 96
CFG = DiTConfig(dim=64, depth=2, heads=4, ff_mult=2, conv_layers=1, max_frames=256, duration_embed=True)


@pytest.fixture(scope="module")
def model() -> DiT:
    torch.manual_seed(0)
    m = DiT(CFG).eval()
    with torch.no_grad():  # the official init zeroes text fusion; random weights exercise every path
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


@pytest.fixture()
def cond() -> SongConditions:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 364, (1, FRAMES), generator=g)
    text[:, ::3] = 0
    return SongConditions(
        text=text,
        style=torch.randn(1, 512, generator=g),
        negative_style=torch.randn(1, 512, generator=g),
        song_duration=torch.tensor([FRAMES / CFG.max_frames]),
    )


SETTINGS = SamplerSettings(steps=4, cfg_strength=4.0)


def test_batched_cfg_equals_two_separate_forwards(model, cond):
    noise = take_noise([7], FRAMES, 64)
    fast = sample(model, cond, noise, SETTINGS)
    slow = sample_reference(model, cond, noise, SETTINGS)
    assert torch.allclose(fast, slow, atol=2e-5, rtol=0), (fast - slow).abs().max()


def test_takes_batch_equals_single_takes(model, cond):
    seeds = [11, 12, 13]
    batched = sample(model, cond, take_noise(seeds, FRAMES, 64), SETTINGS)
    for i, s in enumerate(seeds):
        single = sample(model, cond, take_noise([s], FRAMES, 64), SETTINGS)
        assert torch.allclose(batched[i], single[0], atol=2e-5, rtol=0)


def test_takes_are_distinct_and_reproducible(model, cond):
    a = sample(model, cond, take_noise([5, 6], FRAMES, 64), SETTINGS)
    b = sample(model, cond, take_noise([5, 6], FRAMES, 64), SETTINGS)
    assert torch.equal(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-2


def test_without_guidance_only_the_conditional_branch_runs(model, cond):
    settings = SamplerSettings(steps=3, cfg_strength=0.0)
    noise = take_noise([3], FRAMES, 64)
    assert torch.allclose(
        sample(model, cond, noise, settings), sample_reference(model, cond, noise, settings), atol=2e-5
    )


def test_edit_mode_keeps_prompt_outside_segments(model, cond):
    prompt = torch.randn(1, FRAMES, 64)
    mask = torch.zeros(FRAMES, dtype=torch.bool)
    mask[20:50] = True
    cond.latent_prompt, cond.generate_mask = prompt, mask
    out = sample(model, cond, take_noise([1, 2], FRAMES, 64), SETTINGS)
    assert torch.equal(out[:, ~mask], prompt.expand(2, -1, -1)[:, ~mask])
    assert not torch.allclose(out[:, mask], prompt.expand(2, -1, -1)[:, mask])
    ref = sample_reference(model, cond, take_noise([1, 2], FRAMES, 64), SETTINGS)
    assert torch.allclose(out, ref, atol=2e-5)


def test_step_callback_reports_and_can_cancel(model, cond):
    seen = []
    sample(model, cond, take_noise([0], FRAMES, 64), SETTINGS, on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def cancel_after_two(k, n):
        if k == 2:
            raise GenerationCanceled("canceled by user")

    with pytest.raises(GenerationCanceled):
        sample(model, cond, take_noise([0], FRAMES, 64), SETTINGS, on_step=cancel_after_two)


def test_null_text_path_is_shared_between_requests(model, cond):
    model._null_text_cache.clear()
    sample(model, cond, take_noise([0], FRAMES, 64), SETTINGS)
    cached = model.null_text_embedding(FRAMES, "cpu")
    sample(model, cond, take_noise([1], FRAMES, 64), SETTINGS)
    assert model.null_text_embedding(FRAMES, "cpu") is cached
    assert torch.allclose(cached, model.embed_text(torch.zeros(1, FRAMES, dtype=torch.long)))


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="cfg_strength"):
        SamplerSettings(cfg_strength=-1)
    with pytest.raises(ValueError, match="does not fit"):
        sample(
            DiT(CFG),
            SongConditions(
                torch.zeros(1, 8, dtype=torch.long),
                torch.zeros(1, 512),
                torch.zeros(1, 512),
                torch.tensor([0.1]),
            ),
            torch.zeros(1, 9, 64),
            SETTINGS,
        )


def test_bf16_weights_keep_fp32_rope_and_time(model, cond):
    """bf16 weights run and stay close to fp32 (RoPE/timestep features are fp32 in both)."""
    m16 = DiT(CFG).eval()
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    noise = take_noise([9], FRAMES, 64)
    a = sample(model, cond, noise, SETTINGS)
    b = sample(m16, cond, noise, SETTINGS)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.25 * a.abs().max()


# --------------------------------------------------------------------------------------------------
# several requests in one batch (the service's batched path)


def _request(seed: int, duration: float = FRAMES / CFG.max_frames, edit: bool = False) -> SongConditions:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 364, (1, FRAMES), generator=g)
    text[:, ::4] = 0
    cond = SongConditions(
        text=text,
        style=torch.randn(1, 512, generator=g),
        negative_style=torch.ones(1, 512) * 0.1,  # the pipeline's one negative style for every request
        song_duration=torch.tensor([duration]),
    )
    if edit:
        cond.latent_prompt = torch.randn(1, FRAMES, 64, generator=g)
        cond.generate_mask = torch.zeros(FRAMES, dtype=torch.bool)
        cond.generate_mask[10:40] = True
    return cond


def test_batch_of_requests_equals_each_request_alone(model):
    """Uneven takes, two null groups (different durations), an edit request and per-request guidance
    (one without any) in one batch give what each request gives alone."""
    conds = [_request(1), _request(2, duration=0.5), _request(3, edit=True), _request(4), _request(5)]
    noises = [take_noise([10], FRAMES, 64), take_noise([20, 21, 22], FRAMES, 64),
              take_noise([30, 31], FRAMES, 64), take_noise([40], FRAMES, 64), take_noise([50], FRAMES, 64)]  # fmt: skip
    settings = [SETTINGS, SamplerSettings(4, 2.5), SETTINGS, SamplerSettings(4, 7.0), SamplerSettings(4, 0.0)]
    batched = sample_many(model, conds, noises, settings)
    for cond, noise, s, got in zip(conds, noises, settings, batched, strict=True):
        alone = sample(model, cond, noise, s)
        assert got.shape == alone.shape
        assert torch.allclose(got, alone, atol=2e-5, rtol=0), (got - alone).abs().max()
        assert torch.allclose(got, sample_reference(model, cond, noise, s), atol=2e-5, rtol=0)


def test_a_request_that_stops_leaves_the_batch_and_the_others_finish(model):
    conds = [_request(1), _request(2), _request(3, duration=0.4)]
    noises = [take_noise([1, 2], FRAMES, 64), take_noise([3], FRAMES, 64), take_noise([4, 5], FRAMES, 64)]
    steps_seen = {0: [], 1: [], 2: []}

    def cb(r, stop_at=None):
        def on_step(k, n):
            steps_seen[r].append(k)
            if k == stop_at:
                raise GenerationCanceled(f"request {r} canceled")

        return on_step

    out = sample_many(model, conds, noises, [SETTINGS] * 3, [cb(0, stop_at=2), cb(1), cb(2, stop_at=3)])
    assert isinstance(out[0], GenerationCanceled) and isinstance(out[2], GenerationCanceled)
    assert steps_seen == {0: [1, 2], 1: [1, 2, 3, 4], 2: [1, 2, 3]}
    assert torch.allclose(out[1], sample(model, conds[1], noises[1], SETTINGS), atol=2e-5, rtol=0)


def test_everyone_stopping_ends_the_batch(model):
    def stop(k, n):
        raise GenerationCanceled("stop")

    out = sample_many(model, [_request(1), _request(2)], [take_noise([1], FRAMES, 64)] * 2, [SETTINGS] * 2,
                      [stop, stop])  # fmt: skip
    assert all(isinstance(o, GenerationCanceled) for o in out)


def test_batch_rejects_incompatible_requests(model):
    noise = take_noise([1], FRAMES, 64)
    with pytest.raises(ValueError, match="same frame count and step count"):
        sample_many(model, [_request(1)] * 2, [noise] * 2, [SETTINGS, SamplerSettings(5, 4.0)])
    short = SongConditions(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 512), torch.zeros(1, 512),
                           torch.tensor([0.1]))  # fmt: skip
    with pytest.raises(ValueError, match="same frame count"):
        sample_many(model, [_request(1), short], [noise, take_noise([1], 8, 64)], [SETTINGS] * 2)


@pytest.mark.parametrize("fused", [False, True])
def test_sequential_parallel_and_batched_plans_agree(model, fused):
    """The one-row-at-a-time plans (back to back, and in parallel on worker threads: the CPU default)
    and the batched plan compute the same numbers, for a batch of requests with uneven takes (an odd
    number of rows, so the parallel plan also runs a row left over), two null groups, an edit request
    and a request that stops mid-way."""
    conds = [_request(1), _request(2, duration=0.5), _request(3, edit=True), _request(4)]
    noises = [take_noise([10], FRAMES, 64), take_noise([20, 21, 22], FRAMES, 64),
              take_noise([30, 31], FRAMES, 64), take_noise([40], FRAMES, 64)]  # fmt: skip
    settings = [SETTINGS, SamplerSettings(4, 2.5), SETTINGS, SamplerSettings(4, 0.0)]

    def stop_at_2(k, n):
        if k == 2:
            raise GenerationCanceled("leaves the batch")

    callbacks = [None, None, stop_at_2, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parallel plan then runs two rows at a time, one thread each
    if fused:
        fuse(model)
    try:
        runs = {
            name: sample_many(model, conds, noises, settings, callbacks, plan=ExecutionPlan.resolve(name, torch.device("cpu"), DR1))
            for name in ("batched", "sequential", "parallel")
        }  # fmt: skip
    finally:
        unfuse(model)
        torch.set_num_threads(threads)
    assert isinstance(runs["batched"][2], GenerationCanceled)
    for name in ("sequential", "parallel"):
        for batched, other in zip(runs["batched"], runs[name], strict=True):
            if isinstance(batched, BaseException):
                assert isinstance(other, GenerationCanceled)
                continue
            assert torch.allclose(batched, other, atol=1e-5, rtol=0), (name, (batched - other).abs().max())


def test_row_workers_split_the_threads_and_leave_the_callers_alone():
    """Each worker runs with its share of the intra-op threads, two rows really run at the same time,
    the calling thread and threads started later keep the process-wide count, and a row's error
    reaches the caller."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        pool = RowWorkers(2, 4)
        both = threading.Barrier(2)

        def row(_):
            both.wait(timeout=10)  # only passes when two rows run at once
            return torch.get_num_threads(), threading.current_thread().name

        seen = pool.map(row, range(4))
        assert {count for count, _ in seen} == {2}
        assert len({name for _, name in seen}) == 2 and all(n.startswith("musicgen-rows") for _, n in seen)
        assert torch.get_num_threads() == 4
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [4]
        assert RowWorkers.get(2, 4) is RowWorkers.get(2, 4)
        uneven = RowWorkers(2, 3)
        both = threading.Barrier(2)
        assert sorted(count for count, _ in uneven.map(row, range(2))) == [1, 2]
        assert torch.get_num_threads() == 4
        with pytest.raises(ValueError, match="cannot share"):
            RowWorkers(3, 2)

        def fails(i):
            if i == 1:
                raise ValueError("row 1 broke")
            return i

        with pytest.raises(ValueError, match="row 1 broke"):
            pool.map(fails, range(2))
        assert pool.map(lambda i: torch.is_inference_mode_enabled(), [0]) == [True]
    finally:
        torch.set_num_threads(before)


def test_a_forked_child_starts_its_own_row_workers():
    """Threads do not survive a fork: a child must not wait on its parent's (absent) workers."""
    RowWorkers.get(1, 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it inherited, then leave without running pytest's exit code
        os.write(write, str(len(RowWorkers._pools)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"0"
    os.close(read)
    assert RowWorkers._pools  # the parent keeps its own


def test_execution_plan_rule():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert ExecutionPlan.resolve("auto", cpu, DR1) == ExecutionPlan(batched=False, parallel=True)
    assert ExecutionPlan.resolve("sequential", cpu, DR1) == ExecutionPlan(batched=False)
    assert ExecutionPlan.resolve("auto", cuda, DR1) == ExecutionPlan(batched=True, cuda_graph=True)
    assert ExecutionPlan.resolve("auto", mps, DR1) == ExecutionPlan(batched=True)
    assert ExecutionPlan.resolve("batched", cpu, DR1) == ExecutionPlan(batched=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ExecutionPlan.resolve("graphs", cpu, DR1)
    with pytest.raises(ValueError, match="for the CPU"):
        ExecutionPlan.resolve("parallel", cuda, DR1)
    with pytest.raises(ValueError, match="unknown execution plan"):
        ExecutionPlan.resolve("fastest", cpu, DR1)
