"""EngineLoop: the engine driven by a thread of its own, callers on other threads. Takes submitted while
others run join them (they share ticks) and still equal sample_blocks alone; a block callback that
raises cancels its own take only; a tick that fails ends the takes it held with its error and the loop
goes on with a fresh engine."""

from __future__ import annotations

import threading

import pytest
import torch

from musicgen.engine import DR2Engine
from musicgen.engine.loop import EngineLoop
from musicgen.model.dr2_sampler import sample_blocks
from tests.musicgen.engine.test_dr2_engine import TOL, take


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from musicgen.model.loading import load_dr2
    from musicgen.tiny import save_tiny_dr2

    return load_dr2(save_tiny_dr2(tmp_path_factory.mktemp("tiny-dr2")), device=torch.device("cpu")).eval()


@pytest.fixture()
def loop(model):
    running = EngineLoop(lambda: DR2Engine(model, device="cpu"))
    yield running
    running.stop()


def alone(model, text, style, noise, settings) -> torch.Tensor:
    (out,) = sample_blocks(model, text[None], style[None], noise[None], settings)
    return out


def test_takes_from_two_threads_share_ticks_and_equal_each_alone(model, loop):
    first, second = take(1, 30, 6), take(2, 12, 3, steps=5, cfg=0.0)
    started = threading.Event()
    handles = {}

    def on_block(handle, block, latents):
        started.set()

    handles["first"] = loop.submit(*first, on_block=on_block)
    assert started.wait(30)  # the first take is under way when the second comes

    def later():
        handles["second"] = loop.submit(*second)

    thread = threading.Thread(target=later)
    thread.start()
    thread.join()
    loop.wait(handles.values(), timeout=60)
    engine = loop.engine
    assert engine.rows_sampled > engine.ticks  # some ticks sampled both takes' rows
    for name, args in (("first", first), ("second", second)):
        assert (handles[name].result() - alone(model, *args)).abs().max() <= TOL


def test_a_callback_that_raises_cancels_its_own_take_only(model, loop):
    def refuse(handle, block, latents):
        raise RuntimeError("the request was canceled")

    doomed = loop.submit(*take(3, 20, 4), on_block=refuse)
    kept_args = take(4, 20, 4)
    kept = loop.submit(*kept_args)
    loop.wait([doomed, kept], timeout=60)
    assert doomed.canceled and not kept.canceled
    assert (kept.result() - alone(model, *kept_args)).abs().max() <= TOL


def test_a_failed_tick_ends_its_takes_with_the_error_and_the_loop_goes_on(model):
    broken = {"left": 1}

    def make_engine():
        engine = DR2Engine(model, device="cpu")
        step = engine.step

        def failing_once():
            if broken["left"]:
                broken["left"] -= 1
                raise torch.OutOfMemoryError("simulated")
            return step()

        engine.step = failing_once
        return engine

    loop = EngineLoop(make_engine)
    try:
        lost = loop.submit(*take(5, 10, 2))
        loop.wait([lost], timeout=60)
        assert isinstance(loop.error(lost), torch.OutOfMemoryError) and not lost.done
        args = take(6, 10, 2)
        after = loop.submit(*args)
        loop.wait([after], timeout=60)
        assert loop.error(after) is None and (after.result() - alone(model, *args)).abs().max() <= TOL
        load = loop.load()
        assert (load["running"], load["waiting"]) == (0, 0) and isinstance(load["cache_bytes"], int)
    finally:
        loop.stop()
