"""A resolver for deliveries in production: a target whose name resolves to loopback,
private or otherwise non-global addresses is not connected to (the URL check at
subscription time only sees literal addresses; a name can point anywhere, and later
somewhere else)."""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from notify.rules import global_address


class PublicOnly(AbstractResolver):
    def __init__(self) -> None:
        self.inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        public = [r for r in found if global_address(r["host"])]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self.inner.close()

    def __repr__(self) -> str:
        return f"PublicOnly({self.inner!r})"
