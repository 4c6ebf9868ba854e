"""The two drivers of the protocol's steps (steps.py): `SyncDriver` on a blocking redis.Redis (the GPU
worker's threads, the `musicgen keys` command) and `AsyncDriver` on redis.asyncio (the ingress's event
loop). Both register the Lua scripts once and turn every Redis error into `StoreUnavailable`, so no
caller depends on redis-py's exceptions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff

from deployments.service.store.records import JobEvent
from deployments.service.store.schema import NOTIFY
from deployments.service.store.scripts import SCRIPTS
from deployments.service.store.steps import Call, Pipeline, Script, Step, Steps

R = TypeVar("R")


class StoreUnavailable(Exception):
    """The store could not answer: Redis is unreachable or timed out (or refused the command, as a
    server that is out of memory or still loading its data does). `kind` names the Redis error."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind

    @classmethod
    def wrapping(cls, exc: redis.RedisError) -> StoreUnavailable:
        return cls(type(exc).__name__, str(exc))


def client_options(retry_class: Callable[..., Any]) -> dict[str, Any]:
    # A store read that takes seconds is an outage: fail fast with STORE_UNAVAILABLE. A pooled
    # connection that a Redis restart closed is retried on a new one (three tries, 50-500 ms apart).
    return {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


@contextlib.contextmanager
def _unavailable(steps: Steps[Any]) -> Iterator[None]:
    """A Redis error while the steps run: the steps are closed and the caller gets StoreUnavailable."""
    try:
        yield
    except redis.RedisError as exc:
        steps.close()
        raise StoreUnavailable.wrapping(exc) from exc


def _advance(steps: Steps[R], reply: Any) -> tuple[bool, Any]:
    """Send the last step's reply in (None at the start): (True, the next step) or (False, the result)."""
    try:
        return True, steps.send(reply)
    except StopIteration as done:
        return False, done.value


class SyncDriver:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    @classmethod
    def from_url(cls, url: str) -> SyncDriver:
        from redis.retry import Retry

        return cls(redis.Redis.from_url(url, **client_options(Retry)))

    def run(self, steps: Steps[R]) -> R:
        with _unavailable(steps):
            more, value = _advance(steps, None)
            while more:
                more, value = _advance(steps, self._run_step(value))
            result: R = value  # the steps' return value
            return result

    def _run_step(self, step: Step) -> Any:
        if isinstance(step, Script):
            return self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, Pipeline):
            pipe = self.client.pipeline(transaction=False)
            for call in step.calls:
                getattr(pipe, call.method)(*call.args, **call.kwargs)
            return pipe.execute()
        return getattr(self.client, step.method)(*step.args, **step.kwargs)

    def close(self) -> None:
        self.client.close()


class _Reconnects:
    """Counts a pub/sub connection's reconnections (a connect callback must be a bound method)."""

    def __init__(self) -> None:
        self.count = 0

    async def on_connect(self, connection: Any) -> None:
        self.count += 1


class AsyncDriver:
    """Use it from one event loop only."""

    def __init__(self, client: redis.asyncio.Redis):
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 32) -> AsyncDriver:
        from redis.asyncio.retry import Retry

        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, **client_options(Retry)
        )
        return cls(redis.asyncio.Redis(connection_pool=pool))

    async def run(self, steps: Steps[R]) -> R:
        with _unavailable(steps):
            more, value = _advance(steps, None)
            while more:
                more, value = _advance(steps, await self._run_step(value))
            result: R = value
            return result

    async def _run_step(self, step: Step) -> Any:
        if isinstance(step, Script):
            return await self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, Pipeline):
            async with self.client.pipeline(transaction=False) as pipe:
                for call in step.calls:
                    getattr(pipe, call.method)(*call.args, **call.kwargs)
                return await pipe.execute()
        assert isinstance(step, Call)
        return await getattr(self.client, step.method)(*step.args, **step.kwargs)

    @contextlib.asynccontextmanager
    async def notifications(self) -> AsyncIterator[AsyncIterator[JobEvent]]:
        """The events of every job, as they happen, over one pub/sub connection. A lost connection
        ends the iteration with StoreUnavailable, also when redis-py made a new one by itself (its
        retry re-subscribes silently, but what was published in between is lost: the caller must
        subscribe again and read what it missed)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        reconnects = _Reconnects()
        try:
            await pubsub.subscribe(NOTIFY)
            connection: Any = pubsub.connection
            connection.register_connect_callback(reconnects.on_connect)
        except redis.RedisError as exc:
            await _close(pubsub)
            raise StoreUnavailable.wrapping(exc) from exc

        async def events() -> AsyncIterator[JobEvent]:
            while True:
                try:
                    message = await pubsub.get_message(timeout=1.0)
                except redis.RedisError as exc:
                    raise StoreUnavailable.wrapping(exc) from exc
                if reconnects.count:
                    raise StoreUnavailable("ConnectionError", "the subscription was lost and made again")
                if message is not None and message["type"] == "message":
                    yield JobEvent.from_notification(message["data"])

        try:
            yield events()
        finally:
            connection.deregister_connect_callback(reconnects.on_connect)  # it goes back to the pool
            await _close(pubsub)

    async def aclose(self) -> None:
        await self.client.aclose()


async def _close(pubsub: Any) -> None:
    """PubSub.aclose: typed in redis-py 6 and later, untyped before (either satisfies mypy this way)."""
    await pubsub.aclose()
