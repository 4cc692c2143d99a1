"""What aiohttp refuses before any handler runs, answered as problem+json too.

aiohttp's parser refuses a bad request line, an over-long URL or header, too many
headers, a repeated Content-Type or Content-Length, and answers from its protocol object
(`web_protocol.RequestHandler.handle_error`): text/plain, always 400, with a traceback in
the log. No middleware sees those requests, and aiohttp has no public hook for them
(aio-libs/aiohttp#3287), so the ingress runs its app with `ProblemRunner`, whose server
makes `ProblemRequestHandler`s: the same protocol with `handle_error` answering a Problem
with the right status (400, 414 URL too long, 431 headers too large), logged at DEBUG
without a traceback, and counted through `on_error`.

It also hands a chunked body's framing error to the handler reading that body (see
`data_received`). The aiohttp internals this relies on (`AppRunner._make_server`,
`Server._kwargs`, the signature of `RequestHandler.handle_error`, its `_messages`,
`_current_request` and `_ErrInfo`, the parser's exception types and messages) are
pinned by tests/unit/ingress/test_ingress_parts.py, which fails if aiohttp moves them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from ingress.problems import Problem

log = logging.getLogger(__name__)

# The request line (method, target, version) and each header line. They differ so that
# aiohttp's LineTooLong, which carries the limit it hit, tells which one was too long.
URL_MAX_BYTES = 8192
HEADER_MAX_BYTES = 8190
HEADERS_MAX = 100
# A connection is closed when it has sent no complete request for this long: idle
# keep-alive connections, and clients that send their headers slowly (aiohttp has no
# separate header timeout; its own default is an hour). Longer than the 60 s idle
# timeout of common load balancers, so that they close first.
KEEPALIVE_S = 75.0
_REPEATED = re.compile(r"Duplicate '([A-Za-z0-9-]{1,64})' header found")

OnError = Callable[[int], None]


def problem_for(exc: BaseException | None, status: int) -> Problem:
    """The Problem for what aiohttp's parser raised (status is what aiohttp would send)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == URL_MAX_BYTES:
            return Problem(414, "URL too long", f"the request line takes {URL_MAX_BYTES} bytes "
                           "at most", field="url")  # fmt: skip
        return Problem(431, "header too large", f"a header line takes {HEADER_MAX_BYTES} "
                       "bytes at most", field="headers")  # fmt: skip
    if isinstance(exc, BadStatusLine):
        return Problem(400, "bad request line", "expected METHOD TARGET HTTP/1.1",
                       field="request line")  # fmt: skip
    if isinstance(exc, BadHttpMessage):
        message = exc.message
        if "Too many headers" in message:
            return Problem(431, "too many headers", f"a request takes {HEADERS_MAX} headers "
                           "at most", field="headers")  # fmt: skip
        if isinstance(exc, TransferEncodingError) or "chunk" in message.lower():
            return Problem(400, "malformed body framing", message.splitlines()[0][:200] or None,
                           field="body")  # fmt: skip
        repeated = _REPEATED.search(message)
        if repeated:
            name = repeated.group(1)
            return Problem(400, "repeated header", f"{name} is given more than once; give "
                           "it once", field=name)  # fmt: skip
        return Problem(400, "malformed request", message.splitlines()[0][:200] or None,
                       field="request")  # fmt: skip
    if status >= 500:
        return Problem(500, "internal error", "see the ingress log")
    return Problem(status, "malformed request", None, field="request")


class ProblemRequestHandler(RequestHandler):
    """aiohttp's protocol, answering its own errors as problems."""

    __slots__ = ("_on_error",)

    def __init__(self, manager: web.Server, *, on_error: OnError, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_error = on_error

    def data_received(self, data: bytes) -> None:
        # When a chunked body breaks its framing after the handler started reading it,
        # aiohttp's parser drops the body without a word to the reader (which would
        # wait for its deadline) and queues the error as the next "request". Hand the
        # error to the reader instead: the handler answers 400 at once.
        queued = len(self._messages)
        super().data_received(data)
        request = self._current_request
        if request is None or len(self._messages) <= queued:
            return
        message = self._messages[-1][0]
        if isinstance(message, _ErrInfo) and not request.content.is_eof():
            request.content.set_exception(message.exc)
            # And no more body to come: aiohttp reads what is left of an unread body
            # after the answer, and would trip over the error (a logged traceback).
            request.content.feed_eof()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("ingress: error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("ingress: refused a request from %s: %r", request.remote, exc)
        if request.writer.output_size > 0:
            # Part of an answer is out: nothing else can be sent (aiohttp's own rule).
            raise ConnectionError("an answer was partly sent; cannot send a problem")
        problem = problem_for(exc, status)
        problem.close = True  # what follows on the connection cannot be trusted
        self._on_error(problem.status)
        return problem.response()


class ProblemServer(web.Server):
    """An aiohttp server whose connections are ProblemRequestHandlers."""

    def __init__(self, plain: web.Server, *, on_error: OnError) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **plain._kwargs,
        )
        self.on_error = on_error

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, on_error=self.on_error,
                                     **self._kwargs)  # fmt: skip


class ProblemRunner(web.AppRunner):
    """`web.AppRunner` for an app whose parser errors are problems (see the module)."""

    def __init__(self, app: web.Application, *, on_error: OnError, **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", URL_MAX_BYTES)
        kwargs.setdefault("max_field_size", HEADER_MAX_BYTES)
        kwargs.setdefault("max_headers", HEADERS_MAX)
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S)
        super().__init__(app, **kwargs)
        self.on_error = on_error

    async def _make_server(self) -> web.Server:
        return ProblemServer(await super()._make_server(), on_error=self.on_error)
