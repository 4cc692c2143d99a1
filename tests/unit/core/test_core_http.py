"""What the web servers share (core.http): the problem+json answer, JSON answers, /livez
and serving an app on loopback."""

from __future__ import annotations

import aiohttp
import msgspec
from aiohttp import web

from core.http import WebServer, json_response, livez, problem_body, problem_response
from harness.procs import free_port


def test_a_problem_names_its_members_and_leaves_out_what_is_not_given() -> None:
    assert problem_body(404, "no such shard") == {
        "type": "about:blank", "title": "no such shard", "status": 404,
    }  # fmt: skip
    assert problem_body(400, "bad", "why", field="legs[0].to", shard_id=3) == {
        "type": "about:blank", "title": "bad", "status": 400, "detail": "why",
        "field": "legs[0].to", "shard_id": 3,
    }  # fmt: skip


def test_a_problem_answer_is_problem_json_with_its_headers() -> None:
    response = problem_response(503, "down", "retry", field="kafka", headers={"Retry-After": "2"})
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == "2"
    assert isinstance(response.body, bytes)
    assert msgspec.json.decode(response.body)["field"] == "kafka"
    closing = problem_response(408, "too slow", close=True)
    assert closing.keep_alive is False


def test_json_answers_keep_big_integers_exact() -> None:
    response = json_response({"available": 2**127 - 1}, 202)
    assert response.status == 202 and response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    assert msgspec.json.decode(response.body) == {"available": 2**127 - 1}


async def test_a_server_answers_livez_until_stopped_and_stopping_twice_is_harmless() -> None:
    app = web.Application()
    app.router.add_get("/livez", livez)
    port = free_port()
    server = WebServer(app, "127.0.0.1", port)
    await server.stop()  # never started: nothing to do
    await server.start()
    try:
        url = f"http://127.0.0.1:{port}/livez"
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
    finally:
        await server.stop()
    await server.stop()
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(f"http://127.0.0.1:{port}/livez"):
                raise AssertionError("still answering after stop")
        except aiohttp.ClientConnectionError:
            pass
