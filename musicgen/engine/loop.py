"""A thread that drives one engine, so that callers on any thread share its ticks.

`EngineLoop.submit` queues a take and returns its handle at once; the loop thread runs `engine.step()`
while anything runs or waits, and sleeps otherwise. A take submitted while others run joins them at the
next tick (continuous batching): nobody waits for a batch to end. `wait(handles)` blocks until those
takes are done or canceled. Block callbacks run on the loop thread, between ticks: they must be quick,
and an exception they raise cancels their take instead of stopping the loop.

If a tick fails (out of memory, a bug), every take then running or waiting ends with that error, and
the loop goes on with a fresh engine from `make_engine`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import torch

from musicgen.engine.dr2 import BlockCallback, DR2Engine, SongHandle
from musicgen.model.dr2_sampler import BlockSamplerSettings

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, make_engine: Callable[[], DR2Engine], *, name: str = "dr2-engine"):
        self._make_engine = make_engine
        self.engine = make_engine()
        self._wake = threading.Condition()
        self._pending: list[SongHandle] = []  # submitted, not yet done or failed
        self._errors: dict[SongHandle, Exception] = {}  # a take the failed tick ended -> its error
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers' side (any thread) ------------------------------------------------------------------
    def submit(
        self,
        text_tokens: torch.Tensor,
        style: torch.Tensor,
        noise: torch.Tensor,
        settings: BlockSamplerSettings,
        on_block: BlockCallback | None = None,
    ) -> SongHandle:
        """Queue a take (see DR2Engine.submit, whose errors it raises: a take too big for the budget
        is refused here, before it waits)."""
        with self._wake:
            handle = self.engine.submit(text_tokens, style, noise, settings, _guarded(on_block))
            self._pending.append(handle)
            self._wake.notify_all()
        return handle

    def wait(self, handles: Iterable[SongHandle], timeout: float | None = None) -> None:
        """Block until every handle is done, canceled or failed (see `error`)."""
        wanted = list(handles)
        with self._wake:
            if not self._wake.wait_for(lambda: not any(h in self._pending for h in wanted), timeout):
                raise TimeoutError(f"{sum(h in self._pending for h in wanted)} takes still running")

    def error(self, handle: SongHandle) -> Exception | None:
        """The error of the tick that ended this take, if one did."""
        return self._errors.get(handle)

    def load(self) -> dict[str, int]:
        """What the engine holds now: takes running and waiting, cache bytes held."""
        with self._wake:
            engine = self.engine
            return {
                "running": engine.running,
                "waiting": engine.waiting,
                "cache_bytes": engine.cache.nbytes(),
            }

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(10)

    # -- the loop thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or not self.engine.idle)
                if self._stopping:
                    return
                try:
                    self.engine.step()
                except Exception as exc:  # the engine's state is not to be trusted: start again
                    log.exception(
                        "a DiffRhythm 2 engine tick failed: %d takes end with its error", len(self._pending)
                    )
                    for handle in self._pending:
                        self._errors[handle] = exc
                    self._pending.clear()
                    self.engine = self._make_engine()
                self._pending = [h for h in self._pending if not (h.done or h.canceled)]
                self._wake.notify_all()


def _guarded(on_block: BlockCallback | None) -> BlockCallback | None:
    """A block callback whose exception cancels its take rather than the loop's tick."""
    if on_block is None:
        return None

    def call(handle: SongHandle, block: int, latents: torch.Tensor) -> None:
        try:
            on_block(handle, block, latents)
        except Exception:
            handle.cancel()

    return call
