"""Reading request bodies within a size, a time and a memory budget (the HTTP layer's part
of bounding each request's cost; api.py calls these before any other work on a body).

    read_body      the body, 413 when over `max_body_bytes`, 408 when it does not arrive
                   within `body_timeout_s` (a stalled client holds nothing for long)
    discard_body   what is left of a refused request's body, read and dropped (bounded), so a
                   client that sends everything before reading the answer reads it, not a reset
    BodyBudget     the bytes of bodies one app holds at once; past it, 429 with Retry-After

Errors are `RequestError`s; the app's handler answers them.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request

from cnnray.serve.preprocess import RequestError
from cnnray.serve.schemas import Limits


class BodyBudget:
    """Bytes of request bodies one app holds at once (arrived, not yet decoded), so that
    many concurrent large uploads cannot exhaust the replica's memory: past the budget a
    request is refused with 429 and Retry-After, and the client may try again."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    @asynccontextmanager
    async def hold(self, request: Request, limits: Limits):
        taken = [0]
        try:
            yield await read_body(request, limits, self, taken)
        finally:
            self.held -= taken[0]

    def take(self, n: int, taken: list[int]) -> None:
        if self.held + n > self.limit:
            raise RequestError(429, "the server holds too many request bodies at once: retry in a moment")
        self.held += n
        taken[0] += n


async def read_body(
    request: Request, limits: Limits, budget: BodyBudget | None = None, taken: list[int] | None = None
) -> bytes:
    """The request body, within `limits.max_body_bytes` and `limits.body_timeout_s`.

    413 as soon as the body is known to be over the limit (its Content-Length, or the bytes
    counted as a chunked body streams in); 408 when the whole body has not arrived
    `body_timeout_s` after the handler started reading it, so a slow or stalled client holds
    nothing for long. (The app's RequestError handler then discards what is still coming.)"""
    limit = limits.max_body_bytes
    deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
    size = _declared_length(request)
    if size is not None and size > limit:
        raise RequestError(413, f"body of {size} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    more = True
    while more:
        message = await _receive(request, deadline)
        if message is None:
            request.state.body_done = True  # nothing more will be read: close the connection
            raise RequestError(
                408, f"the request body did not arrive within {limits.body_timeout_s:g} s", close=True
            )
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:  # chunked uploads declare no length: count as they come
            request.state.body_done = not more
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        if budget is not None:
            request.state.body_done = not more
            budget.take(len(chunk), taken if taken is not None else [0])
        chunks.append(chunk)
    request.state.body_done = True
    if size == 0:
        raise RequestError(400, "empty body")
    return b"".join(chunks)


async def discard_body(request: Request, limits: Limits) -> bool:
    """Read and drop what is left of a refused request's body, so that a client that sends
    its whole body before reading the answer (urllib, requests) reads the answer instead of
    a connection reset. Bounded: at most `max_drain_bytes` and `body_timeout_s`. Returns
    whether the connection must be closed after the answer (the body was not all read)."""
    if request.method not in ("POST", "PUT", "PATCH") or getattr(request.state, "body_done", False):
        return False
    declared = _declared_length(request, strict=False)
    if declared == 0:
        return False
    if request.headers.get("expect", "").lower() == "100-continue":
        return True  # the client waits for our answer before it sends: nothing to drain
    if declared is not None and declared > limits.max_drain_bytes:
        return True  # too much to read for nothing: answer now, and close
    deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
    read = 0
    while read <= limits.max_drain_bytes:
        message = await _receive(request, deadline)
        if message is None:
            return True
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return False
    return True


def _declared_length(request: Request, strict: bool = True) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    text = declared.strip()
    if not (text.isascii() and text.isdigit()):
        if not strict:
            return None
        request.state.body_done = True  # framing unknown: do not read, close
        raise RequestError(400, f"bad Content-Length header {declared[:40]!r}", close=True)
    return int(text)


async def _receive(request: Request, deadline: float) -> dict[str, Any] | None:
    """The next ASGI message of the body; None once `deadline` (loop time) has passed.
    A client that went away ends the request with RequestError 499 (nobody reads it)."""
    if deadline - asyncio.get_running_loop().time() <= 0:
        return None
    try:
        # A timer on the loop, not the task per call that asyncio.wait_for creates.
        async with asyncio.timeout_at(deadline):
            message = await request.receive()
    except TimeoutError:
        return None
    if message["type"] == "http.disconnect":
        request.state.body_done = True
        raise RequestError(499, "the client closed the connection")
    return message
