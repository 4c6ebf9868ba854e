"""Flow-matching Euler sampler with classifier-free guidance: a pure function of
(model, conditions, noise, settings).

Same algorithm as the official `CFM.sample` (Euler on `t = linspace(0, 1, steps + 1)`,
`v = pred + (pred - null) * cfg_strength`, the null branch without audio cond and lyrics and with the
negative style), organised so that the numbers stay the same while the work shrinks:

- both CFG branches and all takes of a request run as one batch: rows are [cond x k, null x k];
- several requests of the same length run as one batch too (`sample_many`): one conditional group
  per request and one null group for all that share the null conditioning;
- everything step-invariant is computed once per request (`DiT.prepare`), and the null branch's
  all-filler lyric embedding is shared by every request of the same length;
- each take gets its own reproducible noise, drawn on the CPU from `torch.Generator(seed + i)`, so a
  take does not depend on the device, on the batch it ran in or on how many takes were asked for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import torch

from musicgen.model.dit import Conditioning, DiT

# Called after every Euler step with (steps done, total steps); raising from it stops sampling
# before the next step (that is how a running job is canceled).
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplerSettings:
    """The defaults are the official inference script's, and DiffRhythm 1's defaults in the registry."""

    steps: int = 31  # Euler updates; the official inference script's steps=32 is 32 grid points = 31 updates
    cfg_strength: float = 4.0
    MIN_STEPS: ClassVar[int] = 1

    def __post_init__(self):
        if not self.MIN_STEPS <= self.steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if not 0.0 <= self.cfg_strength <= 50.0:
            raise ValueError(f"cfg_strength must be in 0..50, got {self.cfg_strength}")

    @property
    def uses_guidance(self) -> bool:
        return self.cfg_strength >= 1e-5  # the official threshold below which the null branch is skipped

    def time_grid(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.steps + 1, dtype=torch.float32)


@dataclass
class SongConditions:
    """What one request conditions on; every tensor has a leading batch dim of 1."""

    text: torch.Tensor  # (1, n) frame-aligned model token ids, 0 = filler
    style: torch.Tensor  # (1, 512) style embedding
    negative_style: torch.Tensor  # (1, 512) style of the null branch
    song_duration: torch.Tensor  # (1,) frames / max_frames
    start_time: torch.Tensor | None = None  # (1,), 0 by default
    # edit mode: a latent prompt and a mask of the frames to (re)generate; None means generate all
    latent_prompt: torch.Tensor | None = None  # (1, n, 64)
    generate_mask: torch.Tensor | None = None  # (n,) bool, True where new audio is generated

    @property
    def frames(self) -> int:
        return self.text.shape[1]


PLANS = ("auto", "batched", "sequential", "parallel", "graphs")


@dataclass(frozen=True)
class ExecutionPlan:
    """How one Euler step's rows (both guidance branches, every take, every request) run.

    batched: one forward over all rows. On a GPU that is what fills the device. On a CPU it is slower
        than the same rows one by one (measured with `benchmarks/sampler.py`: a batch-2 step costs more
        than two batch-1 steps on this project's 2-core reference machine), so there rows run as
        forwards of their own. The numbers are the same either way, to fp32 rounding.
    parallel: (with batched False) the rows' forwards run at the same time on worker threads, the
        intra-op threads split evenly among them (2 cores, 2 rows: one core each), instead of back
        to back with all threads each: fewer synchronisations per operation and each core on its own
        data. On the 2-core reference machine one pair of rows measured 1.06-1.09x, a whole song
        1.00-1.05x (medians of `benchmarks/sampler.py` runs).
    cuda_graph: the batched step is captured once as a CUDA graph and replayed for the other steps
        (CUDA only); the capture is dropped when the batch changes (a request leaves it).
    """

    batched: bool = True
    cuda_graph: bool = False
    parallel: bool = False

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> ExecutionPlan:
        """`auto`: rows in parallel on the CPU, batched with a CUDA graph on CUDA, batched elsewhere (MPS)."""
        if name not in PLANS:
            raise ValueError(f"unknown execution plan {name!r}; use one of {', '.join(PLANS)}")
        if name == "auto":
            name = {"cpu": "parallel", "cuda": "graphs"}.get(device.type, "batched")
        if name == "graphs" and device.type != "cuda":
            raise ValueError("the 'graphs' plan needs a CUDA device")
        if name == "parallel" and device.type != "cpu":
            raise ValueError("the 'parallel' plan is for the CPU (it splits the CPU's threads)")
        return cls(
            batched=name in ("batched", "graphs"), cuda_graph=name == "graphs", parallel=name == "parallel"
        )


class _GraphedStep:
    """One velocity call over fixed tensors, captured as a CUDA graph; replaying it reads new inputs
    copied into the captured ones. `pre` must stay alive and unchanged while the graph is used."""

    def __init__(self, model: DiT, rows_in: torch.Tensor, t: torch.Tensor, pre: Conditioning):
        self.x, self.t = rows_in.clone(), t.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model.velocity(self.x, self.t, pre).float()

    def __call__(self, rows_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(rows_in)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


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


def _velocity_by_row(
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


def take_noise(seeds: list[int], frames: int, channels: int) -> torch.Tensor:
    """(len(seeds), frames, channels) fp32 on the CPU; row i is torch.randn under seed seeds[i]."""
    rows = [torch.randn(frames, channels, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows)


def _prompt_and_mask(model: DiT, cond: SongConditions, device) -> tuple[torch.Tensor, torch.Tensor]:
    n, mel = cond.frames, model.cfg.mel_dim
    prompt = cond.latent_prompt if cond.latent_prompt is not None else torch.zeros(1, n, mel)
    mask = cond.generate_mask if cond.generate_mask is not None else torch.ones(n, dtype=torch.bool)
    if prompt.shape != (1, n, mel) or mask.shape != (n,):
        raise ValueError(
            f"latent prompt {tuple(prompt.shape)} / mask {tuple(mask.shape)} do not fit {n} frames"
        )
    return prompt.to(device=device, dtype=torch.float32), mask.to(device)


def sample(
    model: DiT,
    cond: SongConditions,
    noise: torch.Tensor,  # (k, n, 64): one row per take
    settings: SamplerSettings,
    on_step: StepCallback | None = None,
    plan: ExecutionPlan | None = None,
) -> torch.Tensor:
    """Latents (k, n, 64) in fp32, one row per take. An exception raised by `on_step` propagates."""
    (out,) = sample_many(model, [cond], [noise], [settings], [on_step], plan=plan)
    if isinstance(out, BaseException):
        raise out
    return out


def _null_groups(conds: list[SongConditions]) -> tuple[list[int], list[tuple[float, float, torch.Tensor]]]:
    """The null-branch group of each request (0, 1, ... in order of first appearance) and each group's
    (start time, duration, negative style). The null branch sees no lyrics and no latent prompt, so
    requests with equal start time, duration and negative style share one."""
    keys: list[tuple[float, float, torch.Tensor]] = []
    out = []
    for c in conds:
        start = float(c.start_time[0]) if c.start_time is not None else 0.0
        duration = float(c.song_duration[0])
        for j, (s, d, neg) in enumerate(keys):
            if s == start and d == duration and torch.equal(neg, c.negative_style):
                out.append(j)
                break
        else:
            keys.append((start, duration, c.negative_style))
            out.append(len(keys) - 1)
    return out, keys


@torch.inference_mode()
def sample_many(
    model: DiT,
    conds: list[SongConditions],
    noises: list[torch.Tensor],  # per request (k_r, n, 64)
    settings: list[SamplerSettings],
    on_step: list[StepCallback | None] | None = None,
    plan: ExecutionPlan | None = None,
) -> list[torch.Tensor | BaseException]:
    """Sample several requests of the same length and step count as one batch.

    Rows are [cond rows of every request, null rows]; each request is its own conditional group, and
    requests with the same null conditioning share one null group (see `_null_groups`). Each request
    keeps its own guidance strength. When a request's `on_step` raises (canceled, timed out), the
    request leaves the batch before the next step and its slot in the result holds the exception;
    the others go on. Returns per request the latents (k_r, n, 64) in fp32, or that exception.
    `plan` says how each step's rows run (default: `ExecutionPlan.resolve("auto", device)`).
    """
    r_count = len(conds)
    if not r_count or not len(noises) == len(settings) == r_count:
        raise ValueError("give one noise tensor and one settings object per request")
    n, steps = conds[0].frames, settings[0].steps
    if any(c.frames != n for c in conds) or any(s.steps != steps for s in settings):
        raise ValueError("a batch needs requests of the same frame count and step count")
    for noise in noises:
        if noise.shape[1:] != (n, model.cfg.mel_dim):
            raise ValueError(f"noise {tuple(noise.shape)} does not fit {n} frames")
    callbacks = list(on_step) if on_step is not None else [None] * r_count
    device = next(model.parameters()).device
    plan = plan if plan is not None else ExecutionPlan.resolve("auto", device)
    guided = any(s.uses_guidance for s in settings)

    # Work in an order where requests sharing a null group are adjacent, so that the null rows are
    # the conditional rows' x in the same order.
    null_of, null_keys = _null_groups(conds)
    order = sorted(range(r_count), key=lambda r: null_of[r])
    takes = {r: noises[r].shape[0] for r in range(r_count)}
    prompts, masks, step_conds = {}, {}, []
    for r in order:
        prompts[r], masks[r] = _prompt_and_mask(model, conds[r], device)
        step_conds.append(torch.where(masks[r][None, :, None], 0.0, prompts[r]))  # generated frames hidden

    def per_request(get) -> torch.Tensor:
        return torch.cat([get(conds[r]) for r in order]).to(device)

    starts = per_request(lambda c: c.start_time if c.start_time is not None else torch.zeros(1)).float()
    durations = per_request(lambda c: c.song_duration).float()
    groups_cond, groups_text = torch.cat(step_conds), model.embed_text(per_request(lambda c: c.text))
    groups_style = per_request(lambda c: c.style)
    if guided:  # then the null groups, in group order
        u = len(null_keys)
        groups_cond = torch.cat((groups_cond, torch.zeros(u, n, groups_cond.shape[-1], device=device)))
        groups_text = torch.cat((groups_text, model.null_text_embedding(n, device).expand(u, -1, -1)))
        groups_style = torch.cat((groups_style, torch.cat([neg for _, _, neg in null_keys]).to(device)))
        starts = torch.cat((starts, torch.tensor([s for s, _, _ in null_keys], device=device)))
        durations = torch.cat((durations, torch.tensor([d for _, d, _ in null_keys], device=device)))
    pre = model.prepare(groups_cond, groups_text, groups_style, starts, durations)

    active = list(order)  # requests still in the batch, in row order

    def layout(active: list[int]) -> tuple[list[int], tuple[int, ...]]:
        groups = [order.index(r) for r in active]
        rows = [takes[r] for r in active]
        if guided:
            for j in range(len(null_keys)):
                members = [takes[r] for r in active if null_of[r] == j]
                if members:
                    groups.append(r_count + j)
                    rows.append(sum(members))
        return groups, tuple(rows)

    groups, rows = layout(active)  # all groups, in the order prepared
    pre.rows = rows
    x = torch.cat([noises[r] for r in order]).to(device=device, dtype=torch.float32)

    def guidance(active: list[int]) -> torch.Tensor:
        per_row = [settings[r].cfg_strength for r in active for _ in range(takes[r])]
        return torch.tensor(per_row, device=device, dtype=torch.float32)[:, None, None]

    cfg = guidance(active)
    results: list[torch.Tensor | BaseException | None] = [None] * r_count
    t = settings[0].time_grid().to(device)
    graphed: _GraphedStep | None = None
    for i in range(steps):
        rows_in = torch.cat((x, x)) if guided else x
        if not plan.batched:
            v = _velocity_by_row(model, rows_in, t[i], pre, parallel=plan.parallel)
        elif graphed is not None:
            v = graphed(rows_in, t[i])
        elif plan.cuda_graph and i > 0:  # step 0 ran eagerly: kernels chosen, lazy state made
            graphed = _GraphedStep(model, rows_in, t[i], pre)
            v = graphed(rows_in, t[i])
        else:
            v = model.velocity(rows_in, t[i], pre).float()
        if guided:
            k = x.shape[0]
            pred, null = v[:k], v[k:]
            v = pred + (pred - null) * cfg
        x = x + (t[i + 1] - t[i]) * v
        stopped = []
        for r in active:
            if callbacks[r] is None:
                continue
            try:
                callbacks[r](i + 1, steps)
            except Exception as exc:
                results[r] = exc
                stopped.append(r)
        if stopped:
            if len(stopped) == len(active):
                active = []
                break
            keep = torch.tensor([r not in stopped for r in active for _ in range(takes[r])], device=device)
            x = x[keep]
            active = [r for r in active if r not in stopped]
            old_groups = groups
            groups, rows = layout(active)
            pre = pre.select([old_groups.index(g) for g in groups], rows)
            cfg = guidance(active)
            graphed = None  # captured for the old batch; the next step captures the new one

    offset = 0
    for r in active:
        rows_r = x[offset : offset + takes[r]]
        offset += takes[r]
        results[r] = torch.where(masks[r][None, :, None], rows_r, prompts[r])
    return results


@torch.inference_mode()
def sample_reference(
    model: DiT,
    cond: SongConditions,
    noise: torch.Tensor,
    settings: SamplerSettings,
) -> torch.Tensor:
    """The official algorithm, written straightforwardly: per take, two separate forwards per step
    (conditional, then null) that recompute everything. For tests and benchmarks only."""
    device = next(model.parameters()).device
    prompt, mask = _prompt_and_mask(model, cond, device)
    step_cond = torch.where(mask[None, :, None], 0.0, prompt)
    start = (cond.start_time if cond.start_time is not None else torch.zeros(1)).to(device)
    duration = cond.song_duration.to(device)
    text, style, neg = cond.text.to(device), cond.style.to(device), cond.negative_style.to(device)
    t = settings.time_grid().to(device)
    outs = []
    for row in noise:
        x = row[None].to(device)
        for i in range(settings.steps):
            pred = model(x, step_cond, text, t[i], style, start, duration).float()
            if settings.uses_guidance:
                null = model(
                    x, step_cond, text, t[i], neg, start, duration, drop_audio_cond=True, drop_text=True
                )
                pred = pred + (pred - null.float()) * settings.cfg_strength
            x = x + (t[i + 1] - t[i]) * pred
        outs.append(torch.where(mask[None, :, None], x, prompt))
    return torch.cat(outs)
