"""How a loaded model runs, decided once per model: `resolve_execution` (before loading: it checks the
plan and compile settings) and `apply_execution` (after loading: fast paths, then compiling).

The settings (the CLI's --plan / --compile, the service's plan / compile) are the same names for both
model families; what each means, per family and device:

plan        DiffRhythm 1                                  DiffRhythm 2
auto        parallel on the CPU, graphs on CUDA,          batched
            batched elsewhere (MPS)
batched     one forward over all rows of a step           the engine (musicgen.engine): one forward
                                                          per tick over every running take's rows
sequential  each row (branch, take) a forward of its own  each guidance branch a forward of its own
parallel    (CPU) the rows' forwards at the same time     not supported (InvalidParameter)
            on worker threads (musicgen/runtime/workers.py)
graphs      (CUDA) batched, each step a CUDA graph        (CUDA) EXPERIMENTAL: batched, each engine
            replayed after step 0                         tick a CUDA graph per power-of-two row count
                                                          (see musicgen.engine.DR2Engine's graphs)

compile     DiffRhythm 1                                  DiffRhythm 2
auto        on on CUDA only, where it is measured faster  off (the CPU: faster, after a compile per
                                                          replica; CUDA: not measured)
on / off    the transformer blocks / eager                the blocks' MLPs (the attention, which
                                                          writes the key/value cache, stays eager)

Fast paths (DiffRhythm 1, musicgen/runtime/projections.py): fused projections on the CPU, not on CUDA,
where `benchmarks/sampler.py` measured them slower (0.94x eager, 0.99x compiled, at DiffRhythm's size
in bf16: the split outputs are strided, which takes RoPE and the SwiGLU product off their vectorised
kernels); packed weights on the CPU in fp32 where this PyTorch has them, and not together with
compiling (measured: one or the other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from musicgen.errors import InvalidParameter
from musicgen.runtime import projections
from musicgen.runtime.compile import compile_or_fall_back
from musicgen.runtime.graphs import GraphedCall
from musicgen.runtime.workers import velocity_by_row

log = logging.getLogger(__name__)

PLANS = ("auto", "batched", "sequential", "parallel", "graphs")
COMPILE_SETTINGS = ("auto", "on", "off")
_NEEDS = {"parallel": "CPU", "graphs": "CUDA"}  # the device a plan runs on, for recovery hints


class ExecutionRules(Protocol):
    """What a model family says about running it (musicgen.registry.ExecutionRules)."""

    plans: tuple[str, ...]
    auto_plan: tuple[tuple[str, str], ...]
    experimental_plans: tuple[str, ...]
    compile_auto: tuple[str, ...]
    compile_target: str | None
    fast_paths: bool


class Family(Protocol):
    """A model family as the runtime sees it (musicgen.registry.ModelFamily)."""

    title: str
    execution: ExecutionRules


@dataclass(frozen=True)
class ExecutionPlan:
    """How one sampling step's rows run (see the table above).

    batched: one forward over all rows (DiffRhythm 2: over both guidance branches). On a GPU that is
        what fills the device. On a CPU it is slower than the same rows one by one (measured with
        `benchmarks/sampler.py`: a batch-2 step costs more than two batch-1 steps on this project's
        2-core reference machine), so there rows run as forwards of their own. The numbers are the
        same either way, to fp32 rounding.
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

    @property
    def name(self) -> str:
        if self.cuda_graph:
            return "graphs"
        if self.batched:
            return "batched"
        return "parallel" if self.parallel else "sequential"

    @classmethod
    def resolve(cls, name: str, device: torch.device, family: Family) -> ExecutionPlan:
        """The plan `name` means for this model family on this device (ValueError if none)."""
        rules = family.execution
        if name not in PLANS:
            raise ValueError(f"unknown execution plan {name!r}; use one of {', '.join(PLANS)}")
        if name == "auto":
            name = dict(rules.auto_plan).get(device.type, "batched")
        if name == "graphs" and device.type != "cuda":
            raise ValueError("the 'graphs' plan needs a CUDA device")
        if name not in rules.plans:
            raise ValueError(f"the {name!r} plan is not supported by {family.title}")
        if name == "parallel" and device.type != "cpu":
            raise ValueError("the 'parallel' plan is for the CPU (it splits the CPU's threads)")
        return cls(
            batched=name in ("batched", "graphs"), cuda_graph=name == "graphs", parallel=name == "parallel"
        )


def plan_hint(family: Family) -> str:
    """The recovery hint of a refused plan: "use plan auto, batched, ... or graphs (CUDA)"."""
    names = [f"{p} ({_NEEDS[p]})" if p in _NEEDS else p for p in ("auto", *family.execution.plans)]
    return f"use plan {', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class Execution:
    """Everything decided about how one model runs (see `resolve_execution`)."""

    plan: ExecutionPlan
    compile: bool  # torch.compile the family's compiled parts (see compiled_parts)
    compile_required: bool  # compile was `on`: a compile that fails refuses to load
    compile_target: str | None = None  # of each block (None: the whole block)
    fuse: bool = False  # fused projections (DiffRhythm 1's)
    pack: bool = False  # packed weights (DiffRhythm 1's)


def resolve_execution(
    family: Family, device: torch.device, dtype: torch.dtype, *, plan: str = "auto", compile: str = "auto"
) -> Execution:
    """The one place that turns the plan and compile settings into what runs, for a model family on a
    device in a dtype; bad values raise `InvalidParameter` with a recovery hint."""
    if compile not in COMPILE_SETTINGS:
        raise InvalidParameter(f"unknown compile setting {compile!r}", recovery="use auto, on or off")
    try:
        rows = ExecutionPlan.resolve(plan, device, family)
    except ValueError as exc:
        raise InvalidParameter(str(exc), recovery=plan_hint(family)) from None
    rules = family.execution
    compiling = compile == "on" or (compile == "auto" and device.type in rules.compile_auto)
    fast = rules.fast_paths and device.type == "cpu"
    out = Execution(
        plan=rows, compile=compiling, compile_required=compile == "on", compile_target=rules.compile_target,
        fuse=fast, pack=fast and dtype == torch.float32 and not compiling and projections.packing_available(),
    )  # fmt: skip
    if rows.name in rules.experimental_plans:
        log.warning(
            "%s's %r plan is experimental: its latents are not proven equal to eager", family.title, rows.name
        )
    return out


def compiled_parts(model: nn.Module, target: str | None = None) -> list[nn.Module]:
    """The modules `compile` compiles: each transformer block, or its `target` submodule."""
    blocks = list(model.transformer_blocks)
    return [getattr(block, target) for block in blocks] if target else blocks


def apply_execution(
    model: nn.Module, execution: Execution, probe: Callable[[], object] | None = None
) -> None:
    """Put a loaded model in the state `execution` says: fused or packed projections, then compiled
    parts, proven by `probe` (a short forward the pipeline gives; see `compile_or_fall_back`)."""
    if execution.pack:
        projections.pack(model)
    elif execution.fuse:
        projections.fuse(model)
    if execution.compile:
        parts = compiled_parts(model, execution.compile_target)
        compile_or_fall_back(parts, probe or (lambda: None), required=execution.compile_required)


class StepRunner:
    """DiffRhythm 1's velocity of one sampling step under a plan: `runner(i, rows_in, t, pre)` for
    step i; `batch_changed()` when the batch's rows change (a CUDA graph is captured again)."""

    def __init__(self, model: nn.Module, plan: ExecutionPlan):
        self.model, self.plan = model, plan
        self.graphed: GraphedCall | None = None

    def __call__(self, i: int, rows_in: torch.Tensor, t: torch.Tensor, pre) -> torch.Tensor:
        model = self.model
        if not self.plan.batched:
            return velocity_by_row(model, rows_in, t, pre, parallel=self.plan.parallel)
        if self.graphed is None and self.plan.cuda_graph and i > 0:  # step 0 ran eagerly: kernels chosen
            self.graphed = GraphedCall(lambda x, tt: model.velocity(x, tt, pre).float(), rows_in, t)
        if self.graphed is not None:
            return self.graphed(rows_in, t)
        return model.velocity(rows_in, t, pre).float()

    def batch_changed(self) -> None:
        self.graphed = None
