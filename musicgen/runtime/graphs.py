"""The one CUDA-graph helper of both samplers: a call over fixed tensors, captured once and replayed.

DiffRhythm 1's sampler captures one batched velocity step (`graphs` plan) after running step 0
eagerly; DiffRhythm 2's engine captures one fixed-shape tick per row count (its experimental `graphs`
plan) and its block sampler each block's guided step (`sample_blocks(cuda_graph=True)`, measured by
benchmarks/dr2_throughput.py), both with a warm-up run first. A capture is valid while the call keeps
its shape and the tensors it reads besides its inputs (the conditioning, a key/value cache's buffers)
stay alive at the same addresses: its user drops it when a request leaves the batch or the cache is
reallocated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedCall:
    """`fn(*inputs)` captured as a CUDA graph on copies of `inputs`. Calling it with new tensors of the
    same shapes copies them into those copies, replays the graph and returns its output tensor (the
    same tensor at every call: clone it to keep a result past the next call).

    warm_up: run `fn` once on a side stream before capturing (the allocator and the kernels' lazy
    initialisation then happen outside the capture); without it, the caller must have run the same
    call eagerly before."""

    def __init__(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, warm_up: bool = False):
        self.inputs = [t.clone() for t in inputs]
        if warm_up:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.out
