"""`torch.compile` of a model's modules, and compile-or-fall-back at load time.

`nn.Module.compile` on each module: modules of one class share one compiled graph (their parameters
are graph inputs); compilation happens at the first forward of each new shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from torch import nn

from musicgen.errors import ModelNotAvailable

log = logging.getLogger(__name__)


def compile_modules(modules: Iterable[nn.Module], **options) -> None:
    """`torch.compile` each module (`options` go to torch.compile, e.g. `backend`)."""
    for module in modules:
        module.compile(**options)


def uncompile_modules(modules: Iterable[nn.Module]) -> None:
    """Back to eager modules (after `compile_modules`)."""
    for module in modules:
        module._compiled_call_impl = None  # what nn.Module.compile sets


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_or_fall_back(
    modules: list[nn.Module], probe: Callable[[], object], *, required: bool, **options
) -> bool:
    """Compile the modules and prove it now with `probe` (a short forward through them, given by the
    pipeline), not in a user's first song: a machine without a working compiler toolchain (Triton, a C
    compiler) then runs eagerly with a warning when compiling was only `auto`, and refuses to load
    when it was asked for (`on`). Returns whether the modules run compiled."""
    compile_modules(modules, **options)
    try:
        probe()
    except Exception as exc:
        uncompile_modules(modules)
        if required:
            raise ModelNotAvailable(
                f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}",
                recovery="install a C compiler (and Triton on CUDA) or set compile to auto or off",
            ) from None
        log.warning(
            "torch.compile failed (%s: %s): running the DiT eagerly", type(exc).__name__, str(exc)[:300]
        )
        return False
    return True
