"""The Prometheus metrics of one ingress process, and the middleware that answers every
error as a problem and counts every answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from ingress.admission import ClientGone
from ingress.problems import Problem

log = logging.getLogger(__name__)

# Metric labels are bounded: any other method a client invents counts as "other".
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Metrics:
    """Prometheus metrics of one ingress process. Labels are bounded sets (routes,
    methods, statuses, kinds): never an account or command id."""

    def __init__(self) -> None:
        # The *_created series double the output and nobody graphs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tally_ingress_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tally_ingress_request_duration_seconds",
            "Time from request to answer, by route template, method and status.",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.produce = Histogram(
            "tally_ingress_produce_duration_seconds",
            "Time from producing a request's commands to the broker's acknowledgement.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.disconnects = Counter(
            "tally_ingress_client_disconnects",
            "Requests whose client went away before its body arrived (not answered, so "
            "not in tally_ingress_requests_total), by route template and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.commands = Counter(
            "tally_ingress_commands",
            "Commands by kind and outcome (accepted, unavailable) after validation.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._command_children: dict[tuple[str, str], Any] = {}

    def request(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram of one label set, looked up once
        (`labels()` costs more than the increment)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = self._children[key] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        return children

    def command(self, kind: str, outcome: str) -> Any:
        """The command counter of one (kind, outcome), looked up once, as `request`."""
        child = self._command_children.get((kind, outcome))
        if child is None:
            child = self._command_children[kind, outcome] = self.commands.labels(kind, outcome)
        return child

    def refused_by_parser(self, status: int) -> None:
        """Count a request aiohttp's parser refused (see ingress.protocol)."""
        counter, _ = self.request("unparsed", "other", status)
        counter.inc()


def middleware(metrics: Metrics) -> Middleware:
    """Errors as problems, and every answer counted by route template, method and status."""

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"
        try:
            response = await _answer(request, handler, route)
        except ClientGone as gone:
            # Not an error of ours, and no answer can reach the client: counted apart,
            # logged quietly, once.
            metrics.disconnects.labels(route, method).inc()
            log.debug("ingress: client left during %s %s (%s)", request.method, route, gone)
            return web.Response(status=400)
        counter, histogram = metrics.request(route, method, response.status)
        counter.inc()
        histogram.observe(time.perf_counter() - started)
        return response

    return answer


async def _answer(request: web.Request, handler: Handler, route: str) -> web.StreamResponse:
    """The handler's answer, or the problem that says why there is none."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
        field = "body" if exc.status == 413 else None
        return Problem(exc.status, exc.reason, exc.text, field=field, headers=headers).response()
    except ClientGone:
        raise
    except Exception:
        log.exception("ingress: %s %s failed", request.method, route)
        return Problem(500, "internal error", "see the ingress log").response()
