"""Row workers for the `parallel` plan (DiffRhythm 1): a step's rows (guidance branches, takes) as
forwards of their own, at the same time on worker threads that split the intra-op threads among
them; and `velocity_by_row`, the batched velocity computed one row at a time (the `sequential` and
`parallel` plans)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from musicgen.model.dit import Conditioning, DiT


class RowWorkers:
    """Worker threads that split `threads` intra-op threads among themselves (as evenly as they go:
    3 threads over 2 workers are 2 and 1).

    PyTorch's intra-op thread count belongs to the thread that runs an operation (the OpenMP setting
    of that thread), set on a thread's first use from a process-wide value. Each worker makes that
    first use and then sets its own count; the process-wide value is put back at once, so the calling
    thread and threads started later keep theirs. One set per (workers, threads), kept for the process
    (a forked child starts its own: threads do not survive a fork).
    """

    _pools: dict[tuple[int, int], RowWorkers] = {}
    _lock = threading.Lock()

    def __init__(self, workers: int, threads: int):
        if not 1 <= workers <= threads:
            raise ValueError(f"{workers} workers cannot share {threads} threads")
        self.workers, self.threads = workers, threads
        shares = [threads // workers + (i < threads % workers) for i in range(workers)]
        ready = threading.Barrier(workers + 1)
        process_wide = torch.get_num_threads()

        def setup():
            torch.get_num_threads()  # this thread's first use: takes the process-wide count now...
            torch.set_num_threads(shares.pop())  # ...and then its own
            ready.wait(timeout=60)

        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="musicgen-rows", initializer=setup)
        started = [self._executor.submit(lambda: None) for _ in range(workers)]
        ready.wait(timeout=60)  # every worker exists and has set its count (a broken start raises)
        torch.set_num_threads(process_wide)
        for f in started:
            f.result()

    @classmethod
    def get(cls, workers: int, threads: int) -> RowWorkers:
        """The process's workers for (workers, threads), started on first use."""
        with cls._lock:
            pool = cls._pools.get((workers, threads))
            if pool is None:
                pool = cls._pools[(workers, threads)] = cls(workers, threads)
            return pool

    def map(self, fn: Callable, items: list) -> list:
        """fn over items on the workers (at most `workers` at a time), in inference mode, in order."""

        def call(item):
            with torch.inference_mode():
                return fn(item)

        return list(self._executor.map(call, items))


def _forget_workers_after_fork() -> None:
    RowWorkers._pools = {}
    RowWorkers._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def velocity_by_row(
    model: DiT, rows_in: torch.Tensor, t: torch.Tensor, pre: Conditioning, parallel: bool = False
) -> torch.Tensor:
    """The batched velocity computed one row at a time, each row with its own group's conditioning
    (views, no copies). parallel: the rows run on `RowWorkers`, as many at a time as there are
    intra-op threads (at most), each with its share of them; rows left over after the last full round
    run here, with all threads."""
    g = pre.groups
    rows = pre.rows if pre.rows is not None else (rows_in.shape[0] // g,) * g
    conds = [pre.group(j) for j in range(g)]
    group_of = [j for j, count in enumerate(rows) for _ in range(count)]  # of each row

    def one(i: int) -> torch.Tensor:
        return model.velocity(rows_in[i : i + 1], t, conds[group_of[i]]).float()

    n_rows, threads = len(group_of), torch.get_num_threads()
    workers = min(n_rows, threads) if parallel else 1
    together = n_rows - n_rows % workers if workers > 1 else 0
    out = RowWorkers.get(workers, threads).map(one, range(together)) if together else []
    out += [one(i) for i in range(together, n_rows)]
    return torch.cat(out)
