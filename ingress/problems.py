"""RFC 9457 problem details: every error the ingress answers, naming the field at fault."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from core.http import problem_body, problem_response


class Problem(Exception):
    """An error answer. Raised anywhere in a handler; the middleware turns it into the
    response (`core.http.problem_response`). `field` names the offending body field (a
    JSON path like `legs[0].to`), header, query or path parameter. `close`: the
    connection is closed after the answer (what is left of the request cannot be read as
    the next one)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers
        self.close = close
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return problem_body(self.status, self.title, self.detail, field=self.field, **self.extra)

    def response(self) -> web.Response:
        return problem_response(
            self.status, self.title, self.detail, field=self.field, headers=self.headers,
            close=self.close, **self.extra,
        )  # fmt: skip


# msgspec names a bad key of an object (metadata's) "at `key` in `$.metadata`".
_AT = re.compile(r" - at (?:`key` in )?`\$(?P<path>[^`]*)`$")
# The name is the message's end (the path is cut off first): matched to the last
# backtick, so that a name holding a backtick, or an empty one, is named whole.
_NAMED = re.compile(r"(missing required|contains unknown) field `(?P<name>.*)`$")


def from_validation(exc: msgspec.ValidationError, *, prefix: str = "") -> Problem:
    """A 422 naming the field msgspec found at fault, e.g. `amount` or `legs[0].to`."""
    message = str(exc)
    path = ""
    at = _AT.search(message)
    if at:
        path = at.group("path")
        message = message[: at.start()]
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group('name')}"
    # One leading dot only: a field name of its own may begin with dots (".0").
    full = prefix + path
    field = (full[1:] if full.startswith(".") else full) or "body"
    if message.startswith("Invalid value") and field.endswith("kind"):
        title = "unknown command kind"
    elif named and named.group(1) == "missing required":
        title = "missing field"
    elif named:
        title = "unknown field"
    else:
        title = "invalid field"
    return Problem(422, title, message, field=field)
