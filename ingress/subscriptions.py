"""The subscriptions API (#17): create, list, pause/resume and delete the HTTP endpoints
`tally notify` pushes result events to, and list a subscription's failed deliveries.

Every route is a /v1 route: admitted (signed, rate-limited, replay-checked) by the
ingress's own `admit` before anything else. Bad input is a 4xx problem naming the field.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
import msgspec
from aiohttp import web

from ingress.commands import check_unique_keys
from ingress.problems import Problem, from_validation
from notify import store
from notify.rules import Filter, InvalidSubscription, check_filter, check_url
from topics import limits
from topics.schema import INTERNAL_KINDS, PUBLIC_KINDS

Admit = Callable[[web.Request], Awaitable[tuple[str, bytes]]]
TIMEOUT_S = 4.0
_SECRET_LEN = (16, 256)
_json = msgspec.json.Encoder()


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


def _respond(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _no_query(request: web.Request, allowed: tuple[str, ...] = ()) -> None:
    for name in request.query:
        if name not in allowed:
            raise Problem(400, "unknown query parameter", f"{name!r} is not taken here", field=name)


def _path_id(request: web.Request) -> str:
    subscription_id = request.match_info["subscription_id"]
    if not (subscription_id.startswith("sub_") and len(subscription_id) == 36
            and subscription_id[4:].isalnum() and subscription_id.isascii()):  # fmt: skip
        raise Problem(404, "no such subscription", "unknown subscription id",
                      field="subscription_id")  # fmt: skip
    return subscription_id


class Routes:
    def __init__(self, admit: Admit, pool: Callable[[], Any], *, allow_private: bool) -> None:
        self.admit = admit
        self.pool = pool
        self.allow_private = allow_private

    async def _db(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            return await asyncio.wait_for(call(self.pool()), TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as exc:  # fmt: skip
            raise Problem(503, "PostgreSQL unavailable", type(exc).__name__, field="postgres",
                          headers={"Retry-After": "2"}) from None  # fmt: skip

    async def create(self, request: web.Request) -> web.Response:
        _, body = await self.admit(request)
        _no_query(request)
        if request.content_type != "application/json":
            raise Problem(415, "unsupported content type", "send application/json",
                          field="Content-Type")  # fmt: skip
        try:
            new = msgspec.json.decode(body, type=NewSubscription)
        except msgspec.ValidationError as exc:
            raise from_validation(exc) from None
        except msgspec.DecodeError as exc:
            raise Problem(400, "malformed JSON", str(exc)[:200], field="body") from None
        # A key given twice has no one meaning (msgspec keeps the last, others the first).
        check_unique_keys(body)
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
        return _respond(out, 201)

    async def list(self, request: web.Request) -> web.Response:
        await self.admit(request)
        _no_query(request)
        subs = await self._db(store.all_subscriptions)
        return _respond({"subscriptions": [s.public() for s in subs]})

    async def get(self, request: web.Request) -> web.Response:
        await self.admit(request)
        _no_query(request)
        subscription_id = _path_id(request)
        return _respond(self._found(await self._db(lambda p: store.one(p, subscription_id))))

    async def pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        await self.admit(request)
        _no_query(request)
        subscription_id = _path_id(request)
        sub = await self._db(lambda p: store.set_paused(p, subscription_id, paused))
        return _respond(self._found(sub))

    async def delete(self, request: web.Request) -> web.Response:
        await self.admit(request)
        _no_query(request)
        subscription_id = _path_id(request)
        if not await self._db(lambda p: store.delete(p, subscription_id)):
            self._found(None)
        return web.Response(status=204)

    async def redeliver(self, request: web.Request) -> web.Response:
        _, body = await self.admit(request)
        _no_query(request)
        subscription_id = _path_id(request)
        if request.content_type != "application/json":
            raise Problem(415, "unsupported content type", "send application/json",
                          field="Content-Type")  # fmt: skip
        try:
            window = msgspec.json.decode(body, type=RedeliveryRequest)
        except msgspec.ValidationError as exc:
            raise from_validation(exc) from None
        except msgspec.DecodeError as exc:
            raise Problem(400, "malformed JSON", str(exc)[:200], field="body") from None
        check_unique_keys(body)
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
        return _respond(msgspec.structs.asdict(r), 202)

    async def deliveries(self, request: web.Request) -> web.Response:
        await self.admit(request)
        _no_query(request, ("status", "limit"))
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
        return _respond({"deliveries": rows})

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

    def ok(status: int, name: str | None, description: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"description": description}
        if name is not None:
            ref = {"$ref": f"#/components/schemas/{name}"}
            answer["content"] = {"application/json": {"schema": ref}}
        return {str(status): answer}

    sid = {
        "name": "subscription_id", "in": "path", "required": True,
        "schema": {"type": "string", "minLength": 1},
    }  # fmt: skip

    def op(op_id: str, summary: str, answers: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"operationId": op_id, "summary": summary, "security": signed,
                "responses": {**answers, **problems(*errors)}, **more}  # fmt: skip

    one = ok(200, "SubscriptionOut", "The subscription (never its secret).")
    query = [
        {"name": "status", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["failed"]}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": store.DELIVERIES_PAGE_MAX}},
    ]  # fmt: skip
    body = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/NewSubscription"}}}}  # fmt: skip
    return {
        "/v1/subscriptions": {
            "post": op(
                "createSubscription", "Subscribe an HTTP endpoint to result events.",
                {**ok(201, "SubscriptionOut", "Created; a generated secret is shown once."),
                 **problems(409, 415, 422)},
                requestBody=body,
            ),
            "get": op("listSubscriptions", "List subscriptions.",
                      ok(200, "SubscriptionList", "Every subscription.")),
        },
        "/v1/subscriptions/{subscription_id}": {
            "get": op("getSubscription", "One subscription.", one, parameters=[sid]),
            "delete": op("deleteSubscription", "Delete a subscription and its deliveries.",
                         ok(204, None, "Deleted."), parameters=[sid]),
        },
        "/v1/subscriptions/{subscription_id}/pause": {
            "post": op("pauseSubscription", "Stop deliveries until resumed.", one,
                       parameters=[sid]),
        },
        "/v1/subscriptions/{subscription_id}/resume": {
            "post": op("resumeSubscription", "Deliver again from where they stopped.", one,
                       parameters=[sid]),
        },
        "/v1/subscriptions/{subscription_id}/redeliver": {
            "post": op(
                "redeliver", "Deliver again the events decided within [from_ms, to_ms].",
                {**ok(202, "RedeliveryOut", "Requested; the notifier picks it up."),
                 **problems(409, 415, 422)},
                parameters=[sid],
                requestBody={"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/RedeliveryRequest"}}}},
            ),
        },
        "/v1/subscriptions/{subscription_id}/deliveries": {
            "get": op(
                "listDeliveries", "Deliveries given up after the retry horizon.",
                ok(200, "DeliveryList", "Parked deliveries, oldest first."),
                parameters=[sid, *query],
            ),
        },
    }  # fmt: skip
