"""run_guarded and streams: a request's work is cancelled when its client leaves (or its
timeout passes), told by tidegate's protocol (the disconnect extension) or, under other
servers, by a task watching ``receive``; the protocol's way leaves no garbage for the cyclic
collector."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from starlette.requests import Request

from tidegate.api.common import ClientDisconnected
from tidegate.api.guard import DISCONNECT_EXTENSION, run_guarded
from tidegate.api.sse import EventStreamResponse
from tidegate.errors import RequestTimeout

Callbacks = set[Callable[[], None]]


def _scope(callbacks: Callbacks | None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/embeddings",
                             "headers": []}
    if callbacks is not None:
        scope["extensions"] = {DISCONNECT_EXTENSION: {"callbacks": callbacks}}
    return scope


class _Client:
    """``receive`` of an ASGI server without the extension: the body, then ``http.disconnect``
    once :meth:`leave` is called."""

    def __init__(self) -> None:
        self._left = asyncio.Event()
        self._sent_body = False

    def leave(self) -> None:
        self._left.set()

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}


async def _work(started: asyncio.Event, cancelled: asyncio.Event) -> str:
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return "never"


def test_the_protocols_callback_cancels_the_work_and_is_withdrawn_after() -> None:
    async def scenario() -> None:
        callbacks: Callbacks = set()
        started, cancelled = asyncio.Event(), asyncio.Event()
        request = Request(_scope(callbacks), _Client().receive)
        guarded = asyncio.create_task(run_guarded(
            request, _work(started, cancelled), model="m", timeout_s=60))
        await started.wait()
        assert len(callbacks) == 1
        for callback in list(callbacks):  # what LimitedHttpProtocol.connection_lost does
            callback()
        with pytest.raises(ClientDisconnected):
            await guarded
        assert cancelled.is_set() and not callbacks

    asyncio.run(scenario())


def test_finished_work_leaves_no_callback_behind() -> None:
    async def scenario() -> None:
        callbacks: Callbacks = set()

        async def quick() -> str:
            await asyncio.sleep(0)
            assert len(callbacks) == 1
            return "done"

        request = Request(_scope(callbacks), _Client().receive)
        assert await run_guarded(request, quick(), model="m", timeout_s=60) == "done"
        assert not callbacks

    asyncio.run(scenario())


@pytest.mark.parametrize("extension", [True, False], ids=["extension", "watcher"])
def test_the_timeout_cancels_the_work(extension: bool) -> None:
    async def scenario() -> None:
        started, cancelled = asyncio.Event(), asyncio.Event()
        request = Request(_scope(set() if extension else None), _Client().receive)
        with pytest.raises(RequestTimeout):
            await run_guarded(request, _work(started, cancelled), model="m", timeout_s=0.05)
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_without_the_extension_a_task_watches_receive() -> None:
    async def scenario() -> None:
        client = _Client()
        started, cancelled = asyncio.Event(), asyncio.Event()
        guarded = asyncio.create_task(run_guarded(
            Request(_scope(None), client.receive), _work(started, cancelled), model="m",
            timeout_s=60))
        await started.wait()
        await asyncio.sleep(0.02)  # past the watcher's start (5 ms)
        client.leave()
        with pytest.raises(ClientDisconnected):
            await guarded
        assert cancelled.is_set()

    asyncio.run(scenario())


@pytest.fixture
def saved_garbage() -> Iterator[list[Any]]:
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_a_request_that_waited_leaves_no_cyclic_garbage(saved_garbage: list[Any]) -> None:
    """Under overload every admitted request waits; a cancelled watcher task per request made
    each full collection 50-110 ms. The protocol's callback leaves nothing to collect."""

    async def scenario() -> None:
        callbacks: Callbacks = set()
        for _ in range(20):
            async def waits() -> str:
                await asyncio.sleep(0.01)  # longer than the watcher's 5 ms
                return "ok"

            request = Request(_scope(callbacks), _Client().receive)
            assert await run_guarded(request, waits(), model="m", timeout_s=60) == "ok"

    asyncio.run(scenario())
    gc.collect()
    names = {type(obj).__name__ for obj in saved_garbage}
    assert "_RequestGuard" not in names, names


@pytest.mark.parametrize("extension", [True, False], ids=["extension", "watcher"])
def test_a_stream_stops_and_closes_its_source_when_the_client_leaves(extension: bool) -> None:
    async def scenario() -> None:
        callbacks: Callbacks = set()
        yielded, closed = asyncio.Event(), asyncio.Event()
        client = _Client()

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"data: 1\n\n"
                yielded.set()
                await asyncio.Event().wait()
                yield b"never"
            finally:
                closed.set()

        async def send(message: dict[str, Any]) -> None:
            pass

        response = EventStreamResponse(events())
        streaming = asyncio.create_task(
            response(_scope(callbacks if extension else None), client.receive, send))
        await yielded.wait()
        if extension:
            assert len(callbacks) == 1
            for callback in list(callbacks):
                callback()
        else:
            client.leave()
        await streaming  # ends normally: nobody is left to answer
        assert closed.is_set() and not callbacks

    asyncio.run(scenario())
