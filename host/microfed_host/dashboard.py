"""The live dashboard of a mesh run: a read-only web app over the coordinator store (Starlette
on uvicorn, in a daemon thread), so the coordinator's loop is never touched and the broker is
never polled.

    dash = serve("127.0.0.1:8080", run_dir / "coordinator.sqlite", token=None)
    dash.url ... dash.stop()

Routes (GET only; anything else is 405):
    /                 the page (dashboard_static/): overview, nodes, rounds, security events
    /api/snapshot     the whole state as JSON (microfed_host.dashboard_data.snapshot)
    /api/stream       server-sent events: a "snapshot" event whenever the store changed
    /metrics          the Prometheus metrics (microfed_host.metrics.render)
    /static/...       the page's script and style

Bound to localhost unless told otherwise. Bound anywhere else it needs a token (refused
without one): `Authorization: Bearer TOKEN`, or `?token=TOKEN` once in the browser, which sets
a cookie for the page's own requests. docs/dashboard.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from microfed_host.broker import is_loopback

STATIC = Path(__file__).with_name("dashboard_static")
COOKIE = "microfed_dashboard"
PUSH_INTERVAL_S = 1.0  # how often a stream re-reads the store
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
STOP_POLL_S = 0.1  # how soon a waiting stream notices stop()
STOP_FLUSH_S = 5.0  # how long stop() waits for open streams to send the store's last state


class DashboardError(ValueError):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    """"PORT" (localhost) or "HOST:PORT" -> (host, port); DashboardError with a sentence."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(f"--dashboard wants PORT or HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _authorized(token: str | None, headers: Any, query: Any, cookies: Any) -> bool:
    if token is None:
        return True
    given = ""
    auth = headers.get("authorization", "")
    if auth.startswith("Bearer "):
        given = auth[7:]
    given = given or query.get("token", "") or cookies.get(COOKIE, "")
    return hmac.compare_digest(given.encode(), token.encode())


class OpenStreams:
    """How many /api/stream responses are running (a context manager per stream), so stop()
    can wait for each to send its last snapshot before the server closes the connections."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def __enter__(self) -> OpenStreams:
        with self.changed:
            self.count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self.changed:
            self.count -= 1
            self.changed.notify_all()

    def wait_closed(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count == 0, timeout)


def app(store: Path, token: str | None = None, stopping: threading.Event | None = None,
        interval: float = PUSH_INTERVAL_S, streams: OpenStreams | None = None) -> Any:
    """The Starlette application for `store` (see the module doc). Once `stopping` is set,
    every open stream sends the store's state one last time (if it changed) and ends."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from microfed_host import dashboard_data, metrics

    store = Path(store)
    stop = stopping or threading.Event()
    streams = streams or OpenStreams()

    def state() -> str:
        return json.dumps(dashboard_data.snapshot(store), sort_keys=True)

    async def page(request: Request) -> Response:
        resp = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        if token is not None and request.query_params.get("token"):
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    async def api_snapshot(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        return Response(await run_in_threadpool(state), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def api_stream(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        async def events() -> AsyncIterator[str]:
            last = b""
            quiet = 0.0
            yield "retry: 2000\n\n"
            with streams:
                while True:
                    # Read after looking at `stop`: the store's last state (the run marked
                    # done just before the dashboard stops) still reaches every open page.
                    ending = stop.is_set()
                    body = await run_in_threadpool(state)
                    h = hashlib.sha256(body.encode()).digest()
                    if h != last:
                        last, quiet = h, 0.0
                        yield f"event: snapshot\ndata: {body}\n\n"
                    elif quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keepalive\n\n"
                    if ending or await request.is_disconnected():
                        return
                    waited = 0.0
                    while waited < interval and not stop.is_set():
                        await asyncio.sleep(min(STOP_POLL_S, interval - waited))
                        waited += STOP_POLL_S
                    quiet += waited

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def api_metrics(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        return PlainTextResponse(await run_in_threadpool(metrics.render, store),
                                 media_type=metrics.CONTENT_TYPE)

    class TokenCheck(BaseHTTPMiddleware):
        async def dispatch(self, request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            if not _authorized(token, request.headers, request.query_params, request.cookies):
                return JSONResponse({"error": "token required (Authorization: Bearer TOKEN or "
                                              "?token=TOKEN)"}, status_code=401)
            return await call_next(request)

    routes = [Route("/", page), Route("/api/snapshot", api_snapshot),
              Route("/api/stream", api_stream), Route("/metrics", api_metrics),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=[Middleware(TokenCheck)] if token else [])


class Dashboard:
    """A dashboard served from a daemon thread; stop() ends open streams and the server."""

    def __init__(self, listen: str, store: Path, token: str | None = None,
                 interval: float = PUSH_INTERVAL_S) -> None:
        import uvicorn

        host, port = parse_listen(listen)
        if token is not None and len(token) < 16:
            raise DashboardError("a dashboard token needs at least 16 characters")
        if not is_loopback(host) and token is None:
            raise DashboardError(f"the dashboard on {host} would be reachable from other "
                                 "machines: give it a token (--dashboard-token or "
                                 "MICROFED_DASHBOARD_TOKEN), or bind it to 127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(128)  # connections wait in the backlog until uvicorn is up
        except OSError:
            self.sock.close()
            raise
        self.stopping = threading.Event()
        self.streams = OpenStreams()
        self.token = token
        config = uvicorn.Config(app(store, token, self.stopping, interval, self.streams),
                                log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="dashboard", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def stop(self) -> None:
        """Ends the open streams, each after sending the store's last state (a run's end
        reaches the pages that watch it), then the server."""
        self.stopping.set()
        self.streams.wait_closed(STOP_FLUSH_S)
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(listen: str, store: Path, token: str | None = None,
          interval: float = PUSH_INTERVAL_S) -> Dashboard:
    """Serve the dashboard of `store` at `listen` ("PORT" or "HOST:PORT"; port 0: a free one)."""
    return Dashboard(listen, store, token, interval)
