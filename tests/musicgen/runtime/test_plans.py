"""Every execution plan, compiled and not, samples what eager sampling samples, for both model families,
on the tiny models (musicgen/tiny.py) as the pipelines set them up (`resolve_execution`, then
`apply_execution` with the pipeline's compile probe).

The reference on each device is the eager batched sampler over the model as loaded (no fused or
packed projections, nothing compiled). Each batch has a request (DiffRhythm 1) or a row (DiffRhythm 2)
that leaves it mid-way, so a CUDA graph is captured again for the smaller batch. DiffRhythm 2's
batched plans run on the engine, as DR2Pipeline runs them (graphs: its CUDA-graph ticks).

The CUDA cases carry the `gpu` marker and are skipped without CUDA; the CPU plans run everywhere
(compiled only on CUDA: compiling for the CPU is covered by test_fast_paths.py).
"""

from __future__ import annotations

import pytest
import torch

from musicgen.errors import GenerationCanceled
from musicgen.model.dr2_sampler import BlockSamplerSettings, block_noise, sample_blocks
from musicgen.model.loading import load_dit, load_dr2
from musicgen.model.sampler import SamplerSettings, SongConditions, sample_many, take_noise
from musicgen.registry import DR1, DR2, TINY_DIT
from musicgen.runtime.plans import ExecutionPlan, apply_execution, resolve_execution
from musicgen.tiny import ensure_tiny_dr2, ensure_tiny_model

PLANS = {
    ("dr1", "cpu"): ("auto", "batched", "sequential", "parallel"),
    ("dr1", "cuda"): ("auto", "batched", "sequential", "graphs"),
    ("dr2", "cpu"): ("auto", "batched", "sequential"),
    ("dr2", "cuda"): ("auto", "batched", "sequential", "graphs"),
}
# fp32 throughout (TF32 off): the plans differ from eager by rounding alone
ATOL = {"cpu": 1e-5, "cuda": 1e-4}
FRAMES = 64
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cases(family: str):
    for device in ("cpu", "cuda"):
        for plan in PLANS[family, device]:
            for compile in ("off", "on") if device == "cuda" else ("off",):
                marks = _CUDA if device == "cuda" else []
                yield pytest.param(
                    device, plan, compile, marks=marks, id=f"{device}-{plan}-compile_{compile}"
                )


@pytest.fixture
def fp32_exact():
    """No TF32 in matrix multiplies or convolutions; compiled graphs forgotten afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return ensure_tiny_model(root / "dr1")["dit"], ensure_tiny_dr2(root / "dr2")["folder"]


# -- DiffRhythm 1 ----------------------------------------------------------------------------------


def _dr1_batch():
    g = torch.Generator().manual_seed(0)
    conds, noises = [], []
    for r, takes in enumerate((1, 2, 1)):
        conds.append(
            SongConditions(
                text=torch.randint(0, TINY_DIT.text_num_embeds + 1, (1, FRAMES), generator=g),
                style=torch.randn(1, 512, generator=g),
                negative_style=torch.linspace(-1, 1, 512)[None],
                song_duration=torch.tensor([FRAMES / TINY_DIT.max_frames]),
            )
        )
        noises.append(take_noise([10 * r + i for i in range(takes)], FRAMES, TINY_DIT.mel_dim))
    return conds, noises


def _dr1_sample(model, plan: ExecutionPlan) -> list:
    conds, noises = _dr1_batch()

    def leave_at_2(k, n):
        if k == 2:
            raise GenerationCanceled("leaves the batch")

    settings = [SamplerSettings(steps=5, cfg_strength=4.0)] * len(conds)
    return sample_many(model, conds, noises, settings, [None, leave_at_2, None], plan=plan)


@pytest.mark.parametrize("device, plan, compile", list(_cases("dr1")))
def test_dr1_plans_sample_what_eager_samples(tiny_files, fp32_exact, device, plan, compile):
    from musicgen.pipelines.dr1 import _compile_probe

    dev = torch.device(device)
    eager = load_dit(tiny_files[0], TINY_DIT, device=dev, dtype=torch.float32)
    reference = _dr1_sample(eager, ExecutionPlan(batched=True))
    execution = resolve_execution(DR1, dev, torch.float32, plan=plan, compile=compile)
    model = load_dit(tiny_files[0], TINY_DIT, device=dev, dtype=torch.float32)
    apply_execution(model, execution, _compile_probe(model, dev))
    got = _dr1_sample(model, execution.plan)
    assert isinstance(reference[1], GenerationCanceled) and isinstance(got[1], GenerationCanceled)
    for ref, out in zip(reference[::2], got[::2], strict=True):
        diff = (ref - out).abs().max().item()
        assert diff <= ATOL[device], (plan, compile, diff)


# -- DiffRhythm 2 ----------------------------------------------------------------------------------


def _dr2_sample(model, plan: ExecutionPlan, device: torch.device, *, engine: bool) -> list:
    """Three rows, row 1 leaving in the second block; on the engine (`engine`) or by sample_blocks."""
    g = torch.Generator().manual_seed(1)
    rows, blocks, bs = 3, 3, model.cfg.block_size
    text = torch.randint(1, model.cfg.text_num_embeds + 1, (rows, 12), generator=g).to(device)
    style = torch.nn.functional.normalize(torch.randn(rows, 512, generator=g), dim=-1).to(device)
    noise = torch.stack([block_noise(seed, blocks, bs, model.cfg.mel_dim) for seed in range(rows)])

    def prune(blk, k, alive):  # row 1 leaves in the second block
        return [r for r in alive if r != 1] if (blk, k) == (1, 1) else None

    settings = BlockSamplerSettings(steps=4, cfg_strength=2.0)
    if engine:
        from musicgen.engine import DR2Engine

        eng = DR2Engine(model, device=device, graphs=plan.cuda_graph)
        handles = [eng.submit(text[r], style[r], noise[r], settings) for r in range(rows)]
        for _ in range(settings.steps + 1):  # block 0's Euler steps and cache pass, one step of block 1
            eng.step()
        handles[1].cancel()
        eng.run_until_idle()
        return [None if h.canceled else h.result() for h in handles]
    return sample_blocks(model, text, style, noise, settings, prune=prune, batch_branches=plan.batched,
                         cuda_graph=plan.cuda_graph)  # fmt: skip


@pytest.mark.parametrize("device, plan, compile", list(_cases("dr2")))
def test_dr2_plans_sample_what_eager_samples(tiny_files, fp32_exact, device, plan, compile):
    from musicgen.pipelines.dr2 import _compile_probe

    dev = torch.device(device)
    eager = load_dr2(tiny_files[1], device=dev, dtype=torch.float32)
    reference = _dr2_sample(eager, ExecutionPlan(batched=True), dev, engine=False)
    execution = resolve_execution(DR2, dev, torch.float32, plan=plan, compile=compile)
    model = load_dr2(tiny_files[1], device=dev, dtype=torch.float32)
    apply_execution(model, execution, _compile_probe(model, dev))
    got = _dr2_sample(model, execution.plan, dev, engine=DR2.execution.engine and execution.plan.batched)
    assert reference[1] is None and got[1] is None
    for ref, out in zip(reference[::2], got[::2], strict=True):
        assert ref.shape == out.shape, (plan, compile)
        diff = (ref - out).abs().max().item()
        assert diff <= ATOL[device], (plan, compile, diff)


def test_the_plans_a_family_has_not_are_refused():
    """Checked before any model loads (no device needed)."""
    from musicgen.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="not supported by DiffRhythm 2"):
        resolve_execution(DR2, torch.device("cpu"), torch.float32, plan="parallel")
    with pytest.raises(InvalidParameter, match="needs a CUDA device"):
        resolve_execution(DR1, torch.device("cpu"), torch.float32, plan="graphs")
    assert not resolve_execution(DR2, torch.device("cuda"), torch.bfloat16).compile  # auto: off
    assert resolve_execution(DR1, torch.device("cuda"), torch.bfloat16).compile  # auto: on CUDA
    graphs = resolve_execution(DR2, torch.device("cuda"), torch.bfloat16, plan="graphs")
    assert graphs.plan.cuda_graph and graphs.plan.name in DR2.execution.experimental_plans
