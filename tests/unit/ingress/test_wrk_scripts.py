"""The wrk scripts of the HTTP benchmarks (scripts/wrk/signed.lua, signed_get.lua and the
pool.lua they share), run by wrk against a recording server on loopback: every
pre-signed line is sent at most once, as written, and the result line adds up."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
THREADS, LINES = 2, 30
pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def _pool(tmp: Path, rest: str) -> tuple[Path, dict[str, str]]:
    """POOL.0, POOL.1: lines of timestamp, nonce, signature and rest; nonce -> rest."""
    path, written = tmp / "pool", {}
    for t in range(THREADS):
        with open(f"{path}.{t}", "w") as f:
            for i in range(LINES):
                nonce = f"n{t}-{i}".ljust(24, "x")
                written[nonce] = rest.format(t=t, i=i)
                f.write(f"17000000{i:02d} {nonce} {'%064x' % (t * 1000 + i)} {written[nonce]}\n")
    return path, written


async def _run(script: str, args: list[str]) -> tuple[list[bytes], dict[str, object]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head)
                seen.append(head + (await reader.readexactly(int(length[1])) if length else b""))
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 14\r\n\r\n"
                             b'{"accepted":3}')  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "wrk", f"-t{THREADS}", f"-c{THREADS}", "-d1s", "-s", str(ROOT / "scripts" / "wrk" / script),
        f"http://127.0.0.1:{port}/", "--", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    server.close()
    assert proc.returncode == 0, err.decode()
    match = re.search(r"^TALLY-RESULT (\{.*\})$", out.decode(), re.MULTILINE)
    assert match, out.decode() + err.decode()
    return [s for s in seen if b"/livez" not in s], json.loads(match[1])


def _nonces(requests: list[bytes]) -> list[str]:
    return [re.search(rb"Tally-Nonce: (\S+)", r)[1].decode() for r in requests]  # type: ignore[index]


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_signed_posts_each_line_once_and_counts_what_was_accepted(
    tmp_path: Path, mode: str
) -> None:
    path, written = _pool(tmp_path, '{{"t":{t},"i":{i}}}')
    requests, result = await _run("signed.lua", [str(path), "/v1/commands", "kid", mode])
    nonces = _nonces(requests)
    assert len(nonces) == len(set(nonces)) and set(nonces) <= set(written)
    for request, nonce in zip(requests, nonces, strict=True):
        assert request.startswith(b"POST /v1/commands HTTP/1.1\r\n")
        assert b"Tally-Key-Id: kid\r\n" in request and b"Content-Type: application/json" in request
        assert request.endswith(b"\r\n\r\n" + written[nonce].encode())
    assert result["sent"] == THREADS * LINES and result["threads_out_of_pool"] == THREADS
    assert result["statuses"] == {"202": len(requests)}
    assert result["accepted"] == len(requests) * (3 if mode == "batch" else 1)


async def test_signed_gets_each_line_once(tmp_path: Path) -> None:
    path, written = _pool(tmp_path, "/v1/accounts/a{t}-{i}/balances")
    requests, result = await _run("signed_get.lua", [str(path), "kid"])
    nonces = _nonces(requests)
    assert len(nonces) == len(set(nonces)) and set(nonces) <= set(written)
    for request, nonce in zip(requests, nonces, strict=True):
        assert request.startswith(f"GET {written[nonce]} HTTP/1.1\r\n".encode())
        assert b"Content-Length" not in request
    assert result["sent"] == THREADS * LINES and result["threads_out_of_pool"] == THREADS
    assert result["statuses"] == {"202": len(requests)}
