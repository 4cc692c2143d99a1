"""ingress.client against a loopback server that checks every request's signature with the
ingress's own `signing.verify`: what the client sends is what it signed."""

from __future__ import annotations

from aiohttp import web

from harness.procs import free_port
from ingress import signing
from ingress.client import Client

KEYS = {"k1": b"0123456789abcdef0123"}


async def test_every_request_the_client_sends_verifies_with_or_without_a_body() -> None:
    """A body-less POST (pause, resume, redeliver routes) once carried a Content-Type that
    aiohttp adds by itself and the client had not signed: the ingress answered 401."""
    seen: list[tuple[str, list[str]]] = []

    async def check(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.headers.getall("Content-Type", [])))
        try:
            signing.verify(KEYS, request.headers, request.method, request.raw_path, body,
                           max_skew_s=300)  # fmt: skip
        except signing.SignatureError as exc:
            return web.json_response({"field": exc.field}, status=401)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", check)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with Client(f"http://127.0.0.1:{port}", "k1", KEYS["k1"]) as client:
            answers = [
                await client.request("POST", "/v1/subscriptions/sub_1/pause"),
                await client.request("POST", "/v1/commands", b'{"a":1}'),
                await client.request("GET", "/v1/accounts/a%3Ab/balances?consistency=strong"),
                await client.request("DELETE", "/v1/subscriptions/sub_1"),
            ]
    finally:
        await runner.cleanup()
    assert [a.status for a in answers] == [200, 200, 200, 200], answers
    assert seen[0] == ("POST", []) and seen[1] == ("POST", ["application/json"])
