"""A generator replica's batching (JobBatcher) on a plain event loop, with a model that holds each batch
until the test lets it go."""

from __future__ import annotations

import asyncio

import pytest

from deployments.service.batching import JobBatcher


class HeldModel:
    """Records each batch it is given and holds it until `release()`; 'bad' in a batch fails it."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def run(self, job_ids: list[str]) -> list[str]:
        self.batches.append(list(job_ids))
        self.started.set()
        await self.gate.wait()
        if "bad" in job_ids:
            raise RuntimeError("CUDA error: an illegal memory access")
        return [f"done {i}" for i in job_ids]

    async def running(self, n: int) -> None:
        """Until the n-th batch has started."""
        while len(self.batches) < n:
            self.started.clear()
            await self.started.wait()

    def release(self) -> None:
        self.gate.set()


def submit(batcher, *job_ids):
    return [asyncio.create_task(batcher.submit(i)) for i in job_ids]


async def busy(max_size: int) -> tuple[HeldModel, JobBatcher, asyncio.Task]:
    """A batcher whose model runs (and holds) a first batch: job 'a' alone."""
    model = HeldModel()
    batcher = JobBatcher(model.run, max_size=max_size, wait_s=0.05)
    (first,) = submit(batcher, "a")
    await model.running(1)
    return model, batcher, first


def test_jobs_queued_behind_a_running_batch_start_together_however_far_apart_they_came():
    async def main():
        model, batcher, first = await busy(max_size=4)
        later = []
        for job_id in "bcd":
            later += submit(batcher, job_id)
            await asyncio.sleep(0.15)  # three batch windows apart
        assert len(batcher) == 3 and model.batches == [["a"]]
        model.release()
        results = await asyncio.gather(first, *later)
        assert model.batches == [["a"], ["b", "c", "d"]] and batcher.batches == 2
        assert results == ["done a", "done b", "done c", "done d"]

    asyncio.run(main())


def test_a_batch_holds_max_size_jobs_and_the_rest_follow_in_order():
    async def main():
        model, batcher, first = await busy(max_size=2)
        tasks = [first, *submit(batcher, "b", "c", "d", "e")]
        model.release()
        assert await asyncio.gather(*tasks) == [f"done {i}" for i in "abcde"]
        assert model.batches == [["a"], ["b", "c"], ["d", "e"]]

    asyncio.run(main())


def test_an_idle_batcher_waits_for_company_until_full_or_the_window_closes():
    async def main():
        model = HeldModel()
        model.release()
        full_early = JobBatcher(model.run, max_size=2, wait_s=60)  # closes when full, not after 60 s
        tasks = submit(full_early, "a")
        await asyncio.sleep(0.05)
        tasks += submit(full_early, "b")
        assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == ["done a", "done b"]
        assert model.batches == [["a", "b"]]

        model.batches.clear()
        alone = JobBatcher(model.run, max_size=4, wait_s=0.05)  # nobody comes: runs alone
        assert await asyncio.wait_for(alone.submit("c"), 10) == "done c"
        no_wait = JobBatcher(model.run, max_size=4, wait_s=0)
        assert await no_wait.submit("d") == "done d"
        assert await no_wait.submit("e") == "done e"
        assert model.batches == [["c"], ["d"], ["e"]]

    asyncio.run(main())


def test_a_caller_that_leaves_takes_its_waiting_job_out_but_not_a_running_one():
    async def main():
        model, batcher, running = await busy(max_size=4)
        gone, stays = submit(batcher, "b", "c")
        await asyncio.sleep(0)
        gone.cancel()
        running.cancel()  # its batch goes on: the job is claimed and runs to the end
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(asyncio.CancelledError):
            await running
        assert len(batcher) == 1
        model.release()
        assert await stays == "done c"
        assert model.batches == [["a"], ["c"]]

        # every waiting job leaves while an idle batcher's window is open: nothing runs, and the
        # next job gets its own window
        model.batches.clear()
        idle = JobBatcher(model.run, max_size=4, wait_s=0.2)
        (left,) = submit(idle, "d")
        await asyncio.sleep(0.05)
        left.cancel()
        await asyncio.sleep(0.3)
        assert await idle.submit("e") == "done e"
        assert model.batches == [["e"]]

    asyncio.run(main())


def test_a_failed_batch_reaches_each_of_its_callers_and_the_next_batch_runs():
    async def main():
        model, batcher, first = await busy(max_size=2)
        failing = submit(batcher, "bad", "b")
        after = submit(batcher, "c")
        model.release()
        results = await asyncio.gather(first, *failing, *after, return_exceptions=True)
        assert results[0] == "done a" and results[3] == "done c"
        assert all(isinstance(r, RuntimeError) and "illegal memory" in str(r) for r in results[1:3])

        async def short(job_ids):
            return ["only one"]

        miscounted = JobBatcher(short, max_size=2, wait_s=0.05)
        results = await asyncio.gather(*submit(miscounted, "x", "y"), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "2 jobs gave 1 results" in str(r) for r in results)

    asyncio.run(main())


def test_a_stopped_batcher_cancels_its_batch_and_a_new_job_starts_it_again():
    async def main():
        model, batcher, job = await busy(max_size=4)
        batcher._worker.cancel()  # what the replica's event loop does as it shuts down
        with pytest.raises(asyncio.CancelledError):
            await job
        model.release()
        assert await batcher.submit("b") == "done b"

    asyncio.run(main())


@pytest.mark.parametrize("max_size, wait_s", [(0, 0.05), (4, -1)])
def test_bad_settings_are_refused(max_size, wait_s):
    async def run(job_ids):
        return job_ids

    with pytest.raises(ValueError, match="max_size must be >= 1"):
        JobBatcher(run, max_size, wait_s)
