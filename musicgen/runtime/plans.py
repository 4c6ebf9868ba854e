"""How a loaded model runs, decided once per model: `resolve_execution` (before loading: it checks the
plan and compile settings) and `apply_execution` (after loading: fast paths, then compiling).

The settings (the CLI's --plan / --compile, the service's plan / compile) are the same names for both
model families; what each means, per family and device:

plan        DiffRhythm 1                                  DiffRhythm 2
auto        parallel on the CPU, graphs on CUDA,          batched
            batched elsewhere (MPS)
batched     one forward over all rows of a step           both guidance branches in one forward
sequential  each row (branch, take) a forward of its own  each guidance branch a forward of its own
parallel    (CPU) the rows' forwards at the same time     not supported (InvalidParameter)
            on worker threads (musicgen/runtime/workers.py)
graphs      (CUDA) batched, each step a CUDA graph        (CUDA) EXPERIMENTAL: batched, each block's
            replayed after step 0                         step a CUDA graph (see sample_blocks)

compile     DiffRhythm 1                                  DiffRhythm 2
auto        on on CUDA only, where it is measured faster  off (nothing measured)
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
FAMILIES = ("dr1", "dr2")
_RECOVERY = {
    "dr1": "use plan auto, batched, sequential, parallel (CPU) or graphs (CUDA)",
    "dr2": "use plan auto, batched, sequential or graphs (CUDA, experimental)",
}


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

    @classmethod
    def resolve(cls, name: str, device: torch.device, family: str = "dr1") -> ExecutionPlan:
        """The plan `name` means for this model family on this device (ValueError if none)."""
        if name not in PLANS:
            raise ValueError(f"unknown execution plan {name!r}; use one of {', '.join(PLANS)}")
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}")
        if name == "auto":
            name = (
                {"cpu": "parallel", "cuda": "graphs"}.get(device.type, "batched")
                if family == "dr1"
                else "batched"
            )
        if name == "graphs" and device.type != "cuda":
            raise ValueError("the 'graphs' plan needs a CUDA device")
        if name == "parallel" and family == "dr2":
            raise ValueError("the 'parallel' plan is not supported by DiffRhythm 2")
        if name == "parallel" and device.type != "cpu":
            raise ValueError("the 'parallel' plan is for the CPU (it splits the CPU's threads)")
        return cls(
            batched=name in ("batched", "graphs"), cuda_graph=name == "graphs", parallel=name == "parallel"
        )


@dataclass(frozen=True)
class Execution:
    """Everything decided about how one model runs (see `resolve_execution`)."""

    family: str
    plan: ExecutionPlan
    compile: bool  # torch.compile the family's compiled parts (see compiled_parts)
    compile_required: bool  # compile was `on`: a compile that fails refuses to load
    fuse: bool = False  # DiffRhythm 1's fused projections
    pack: bool = False  # DiffRhythm 1's packed weights

    @property
    def experimental(self) -> bool:
        return self.family == "dr2" and self.plan.cuda_graph


def resolve_execution(
    family: str, device: torch.device, dtype: torch.dtype, *, plan: str = "auto", compile: str = "auto"
) -> Execution:
    """The one place that turns the plan and compile settings into what runs, for a model family on a
    device in a dtype; bad values raise `InvalidParameter` with a recovery hint."""
    if compile not in COMPILE_SETTINGS:
        raise InvalidParameter(f"unknown compile setting {compile!r}", recovery="use auto, on or off")
    try:
        rows = ExecutionPlan.resolve(plan, device, family)
    except ValueError as exc:
        raise InvalidParameter(str(exc), recovery=_RECOVERY.get(family, "")) from None
    dr1 = family == "dr1"
    compiling = compile == "on" or (compile == "auto" and dr1 and device.type == "cuda")
    on_cpu = device.type == "cpu"
    out = Execution(
        family=family, plan=rows, compile=compiling, compile_required=compile == "on",
        fuse=dr1 and on_cpu,
        pack=dr1 and on_cpu and dtype == torch.float32 and not compiling and projections.packing_available(),
    )  # fmt: skip
    if out.experimental:
        log.warning("DiffRhythm 2's 'graphs' plan is experimental: its latents are not proven equal to eager")
    return out


def compiled_parts(model: nn.Module, family: str) -> list[nn.Module]:
    """The modules `compile` compiles: DiffRhythm 1's blocks, DiffRhythm 2's blocks' MLPs."""
    if family == "dr2":
        return [block.mlp for block in model.transformer_blocks]
    return list(model.transformer_blocks)


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
        parts = compiled_parts(model, execution.family)
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
