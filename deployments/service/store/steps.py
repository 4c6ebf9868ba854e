"""The store's protocol as steps: each operation is a generator that yields Redis steps and receives
each step's reply, so it is written once and run by either driver (drivers.py): a blocking one for the
GPU worker's threads, an asyncio one for the ingress's event loop.

    class JobOps(Ops):
        @operation
        def get(self, job_id: str) -> Steps[SongJob | None]:
            h = yield Call("hgetall", (job_key(job_id),))
            return SongJob.from_hash(h) if h else None

    class JobStore(JobOps, OnSync): ...    # store.get(id) -> SongJob | None
    class AsyncJobStore(JobOps, OnAsync): ...  # store.get(id) -> Awaitable[SongJob | None]

`Operation.steps` is the undriven generator function (tests interleave other writes between steps).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeAlias, TypeVar, overload

R = TypeVar("R")
P = ParamSpec("P")
S = TypeVar("S")


@dataclass(frozen=True)
class Call:
    """One client call: `method` of redis.Redis / redis.asyncio.Redis with these arguments."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Script:
    """One of the store's Lua scripts (scripts.py), by name."""

    name: str
    keys: Sequence[str]
    args: Sequence[Any]


@dataclass(frozen=True)
class Pipeline:
    """Calls sent together (one round trip, not a transaction); the reply is the list of replies."""

    calls: tuple[Call, ...]


Step: TypeAlias = Call | Script | Pipeline
Steps: TypeAlias = Generator[Step, Any, R]


def reply(step: Step) -> Steps[Any]:
    """One step as a protocol of its own: `yield from reply(step)`, or to run one step on a driver."""
    return (yield step)


class SyncRunner(Protocol):
    def run(self, steps: Steps[R]) -> R: ...


class AsyncRunner(Protocol):
    async def run(self, steps: Steps[R]) -> R: ...


class OnSync:
    """Base of a store whose operations run on a blocking client and return their results."""

    driver: SyncRunner


class OnAsync:
    """Base of a store whose operations run on redis.asyncio and return awaitables of their results."""

    driver: AsyncRunner


class Operation(Generic[S, P, R]):
    """A protocol operation: `steps(self, ...)` yields its Redis steps and returns R. Read from an
    `OnSync` store it is a function returning R; from an `OnAsync` store, one returning an awaitable
    of R. A non-data descriptor: tests may replace it on one store instance."""

    def __init__(self, steps: Callable[Concatenate[S, P], Steps[R]]) -> None:
        self.steps = steps
        self.__doc__, self.__name__ = steps.__doc__, getattr(steps, "__name__", "operation")

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Operation[S, P, R]: ...
    @overload
    def __get__(self, instance: OnSync, owner: type[Any]) -> Callable[P, R]: ...
    @overload
    def __get__(self, instance: OnAsync, owner: type[Any]) -> Callable[P, Awaitable[R]]: ...

    def __get__(self, instance: Any, owner: type[Any]) -> Any:
        if instance is None:
            return self
        steps, runner = self.steps, instance.driver.run

        @functools.wraps(steps)
        def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            return runner(steps(instance, *args, **kwargs))

        return run


def operation(steps: Callable[Concatenate[S, P], Steps[R]]) -> Operation[S, P, R]:
    return Operation(steps)
