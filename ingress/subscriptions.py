"""The subscriptions API (#17): create, list, pause/resume and delete the HTTP endpoints
`tally notify` pushes result events to, and list a subscription's failed deliveries.

Every route is a /v1 route: admitted (signed, rate-limited, replay-checked) by the
ingress's own `admit` before anything else. Bad input is a 4xx problem naming the field.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from core.http import json_response
from ingress.checks import json_body, no_query, postgres
from ingress.commands import check_unique_keys
from ingress.problems import Problem, from_validation
from notify import store
from notify.rules import Filter, InvalidSubscription, check_filter, check_url
from topics import limits
from topics.schema import INTERNAL_KINDS, PUBLIC_KINDS

Admit = Callable[[web.Request], Awaitable[tuple[str, bytes]]]
_SECRET_LEN = (16, 256)
_T = TypeVar("_T")


class NewSubscription(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A subscription to create. Without a secret one is generated and shown once."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    secret: str | None = None
    filter: Filter = Filter()


class RedeliveryRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Deliver again the matching events the engine decided within [from_ms, to_ms]."""

    from_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    to_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class RedeliveryOut(msgspec.Struct, kw_only=True):
    id: str
    subscription_id: str
    from_ms: int
    to_ms: int


class SubscriptionOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    url: str
    filter: Filter
    paused: bool
    created_at_ms: int
    secret: str | None = None  # only in the answer to a create without a secret


class SubscriptionList(msgspec.Struct, kw_only=True):
    subscriptions: list[SubscriptionOut]


class DeliveryOut(msgspec.Struct, kw_only=True):
    delivery_id: str
    status: str
    topic: str
    partition: int
    offset: int
    command_id: str
    account: str
    attempts: int
    last_error: str
    at_ms: int


class DeliveryList(msgspec.Struct, kw_only=True):
    deliveries: list[DeliveryOut]


def _path_id(request: web.Request) -> str:
    subscription_id = request.match_info["subscription_id"]
    if not (subscription_id.startswith("sub_") and len(subscription_id) == 36
            and subscription_id[4:].isalnum() and subscription_id.isascii()):  # fmt: skip
        raise Problem(404, "no such subscription", "unknown subscription id",
                      field="subscription_id")  # fmt: skip
    return subscription_id


def _decode(request: web.Request, body: bytes, kind: type[_T]) -> _T:
    """The JSON body as `kind`, or the problem naming what is wrong with it (415, 400,
    422); a key given twice has no one meaning (msgspec keeps the last, others the
    first): refused."""
    json_body(request)
    try:
        value = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed JSON", str(exc)[:200], field="body") from None
    check_unique_keys(body)
    return value


class Routes:
    def __init__(self, admit: Admit, pool: Callable[[], Any], *, allow_private: bool) -> None:
        self.admit = admit
        self.pool = pool
        self.allow_private = allow_private

    async def _db(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        return await postgres(call(self.pool()))

    async def _admit_one(self, request: web.Request) -> tuple[str, bytes]:
        """Admit a request about one subscription: its id, checked, and the body."""
        _, body = await self.admit(request)
        no_query(request)
        return _path_id(request), body

    async def create(self, request: web.Request) -> web.Response:
        _, body = await self.admit(request)
        no_query(request)
        new = _decode(request, body, NewSubscription)
        generated = new.secret is None
        secret = new.secret if new.secret is not None else secrets.token_urlsafe(32)
        try:
            url = check_url(new.url, allow_private=self.allow_private)
            lo, hi = _SECRET_LEN
            if not (lo <= len(secret) <= hi and secret.isascii() and secret.isprintable()):
                raise InvalidSubscription("secret", f"{lo}-{hi} printable ASCII characters")
            kinds = (*PUBLIC_KINDS, *INTERNAL_KINDS)
            check_filter(new.filter, account_pattern=limits.ACCOUNT_ID_PATTERN, kinds=kinds)
        except InvalidSubscription as exc:
            raise Problem(422, "invalid subscription", exc.detail, field=exc.field) from None
        sub = store.Subscription(
            id="sub_" + secrets.token_hex(16),
            url=url,
            secret=secret,
            filter=new.filter,
            paused=False,
            created_at_ms=int(time.time() * 1000),
        )
        if not await self._db(lambda pool: store.create(pool, sub)):
            raise Problem(409, "too many subscriptions",
                          f"at most {store.SUBSCRIPTIONS_MAX}", field="url")  # fmt: skip
        out = sub.public()
        if generated:
            out["secret"] = secret
        return json_response(out, 201)

    async def list(self, request: web.Request) -> web.Response:
        await self.admit(request)
        no_query(request)
        subs = await self._db(store.all_subscriptions)
        return json_response({"subscriptions": [s.public() for s in subs]})

    async def get(self, request: web.Request) -> web.Response:
        subscription_id, _ = await self._admit_one(request)
        return json_response(self._found(await self._db(lambda p: store.one(p, subscription_id))))

    async def pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        subscription_id, _ = await self._admit_one(request)
        sub = await self._db(lambda p: store.set_paused(p, subscription_id, paused))
        return json_response(self._found(sub))

    async def delete(self, request: web.Request) -> web.Response:
        subscription_id, _ = await self._admit_one(request)
        if not await self._db(lambda p: store.delete(p, subscription_id)):
            self._found(None)
        return web.Response(status=204)

    async def redeliver(self, request: web.Request) -> web.Response:
        subscription_id, body = await self._admit_one(request)
        window = _decode(request, body, RedeliveryRequest)
        if window.to_ms < window.from_ms:
            raise Problem(422, "invalid window", "to_ms is before from_ms", field="to_ms")
        self._found(await self._db(lambda p: store.one(p, subscription_id)))
        r = store.Redelivery(
            id="rdl_" + secrets.token_hex(16), subscription_id=subscription_id,
            from_ms=window.from_ms, to_ms=window.to_ms,
        )  # fmt: skip
        if not await self._db(lambda p: store.request_redelivery(p, r)):
            raise Problem(409, "too many redeliveries pending",
                          f"at most {store.REDELIVERIES_PENDING_MAX}",
                          field="subscription_id")  # fmt: skip
        return json_response(msgspec.structs.asdict(r), 202)

    async def deliveries(self, request: web.Request) -> web.Response:
        await self.admit(request)
        no_query(request, ("status", "limit"))
        subscription_id = _path_id(request)
        status = request.query.get("status", "failed")
        if status != "failed":
            raise Problem(400, "invalid status", "failed (deliveries given up on)",
                          field="status")  # fmt: skip
        raw_limit = request.query.get("limit", "100")
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4
                and 1 <= int(raw_limit) <= store.DELIVERIES_PAGE_MAX):  # fmt: skip
            raise Problem(400, "invalid limit", f"1-{store.DELIVERIES_PAGE_MAX}", field="limit")
        self._found(await self._db(lambda p: store.one(p, subscription_id)))
        rows = await self._db(
            lambda p: store.deliveries(p, subscription_id, status, int(raw_limit))
        )
        return json_response({"deliveries": rows})

    @staticmethod
    def _found(sub: store.Subscription | None) -> dict[str, Any]:
        if sub is None:
            raise Problem(404, "no such subscription", "unknown subscription id",
                          field="subscription_id")  # fmt: skip
        return sub.public()


def add_routes(
    router: web.UrlDispatcher, admit: Admit, pool: Callable[[], Any], *, allow_private: bool
) -> None:
    """Register the subscription routes; `pool` returns the ingress's asyncpg pool."""
    r = Routes(admit, pool, allow_private=allow_private)
    router.add_post("/v1/subscriptions", r.create)
    router.add_get("/v1/subscriptions", r.list, allow_head=False)
    router.add_get("/v1/subscriptions/{subscription_id}", r.get, allow_head=False)
    router.add_delete("/v1/subscriptions/{subscription_id}", r.delete)
    router.add_post("/v1/subscriptions/{subscription_id}/pause", r.pause)
    router.add_post("/v1/subscriptions/{subscription_id}/resume", r.resume)
    router.add_post("/v1/subscriptions/{subscription_id}/redeliver", r.redeliver)
    router.add_get("/v1/subscriptions/{subscription_id}/deliveries", r.deliveries, allow_head=False)


def schemas() -> list[type]:
    return [NewSubscription, SubscriptionOut, SubscriptionList, DeliveryList,
            RedeliveryRequest, RedeliveryOut]  # fmt: skip


def paths(
    signed: list[dict[str, list[str]]], problems: Callable[..., dict[str, Any]],
    errors: tuple[int, ...],
) -> dict[str, Any]:  # fmt: skip
    """The OpenAPI paths of these routes (schemas named as in `schemas`)."""
    doc = _Operations(signed, problems, errors)
    return {**_collection_paths(doc), **_one_paths(doc)}


def _ok(status: int, name: str | None, description: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if name is not None:
        answer["content"] = {"application/json": {"schema": _ref(name)}}
    return {str(status): answer}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


_SID = {
    "name": "subscription_id", "in": "path", "required": True,
    "schema": {"type": "string", "minLength": 1},
}  # fmt: skip


class _Operations:
    """Operations signed and answering the /v1 errors, as the ingress documents them."""

    def __init__(
        self, signed: list[dict[str, list[str]]], problems: Callable[..., dict[str, Any]],
        errors: tuple[int, ...],
    ) -> None:  # fmt: skip
        self.signed = signed
        self.problems = problems
        self.errors = errors

    def op(self, op_id: str, summary: str, answers: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"operationId": op_id, "summary": summary, "security": self.signed,
                "responses": {**answers, **self.problems(*self.errors)}, **more}  # fmt: skip


def _collection_paths(doc: _Operations) -> dict[str, Any]:
    return {
        "/v1/subscriptions": {
            "post": doc.op(
                "createSubscription", "Subscribe an HTTP endpoint to result events.",
                {**_ok(201, "SubscriptionOut", "Created; a generated secret is shown once."),
                 **doc.problems(409, 415, 422)},
                requestBody=_body("NewSubscription"),
            ),
            "get": doc.op("listSubscriptions", "List subscriptions.",
                          _ok(200, "SubscriptionList", "Every subscription.")),
        },
    }  # fmt: skip


def _one_paths(doc: _Operations) -> dict[str, Any]:
    """The routes of one subscription."""
    one = _ok(200, "SubscriptionOut", "The subscription (never its secret).")
    query = [
        {"name": "status", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["failed"]}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": store.DELIVERIES_PAGE_MAX}},
    ]  # fmt: skip
    base = "/v1/subscriptions/{subscription_id}"
    return {
        base: {
            "get": doc.op("getSubscription", "One subscription.", one, parameters=[_SID]),
            "delete": doc.op("deleteSubscription", "Delete a subscription and its deliveries.",
                             _ok(204, None, "Deleted."), parameters=[_SID]),
        },
        f"{base}/pause": {
            "post": doc.op("pauseSubscription", "Stop deliveries until resumed.", one,
                           parameters=[_SID]),
        },
        f"{base}/resume": {
            "post": doc.op("resumeSubscription", "Deliver again from where they stopped.", one,
                           parameters=[_SID]),
        },
        f"{base}/redeliver": {
            "post": doc.op(
                "redeliver", "Deliver again the events decided within [from_ms, to_ms].",
                {**_ok(202, "RedeliveryOut", "Requested; the notifier picks it up."),
                 **doc.problems(409, 415, 422)},
                parameters=[_SID], requestBody=_body("RedeliveryRequest"),
            ),
        },
        f"{base}/deliveries": {
            "get": doc.op(
                "listDeliveries", "Deliveries given up after the retry horizon.",
                _ok(200, "DeliveryList", "Parked deliveries, oldest first."),
                parameters=[_SID, *query],
            ),
        },
    }  # fmt: skip
