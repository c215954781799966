"""``fleet dashboard``: serve the API and pages with uvicorn, under an optional URL prefix.

Behind an ingress that forwards ``/fleet/...`` unchanged (Flower's standing 404s), the
whole app is mounted at the prefix: every link the pages build starts from it, and the
OpenAPI spec names it as its server.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route

from fleet.config import FleetConfig
from fleet.dashboard.auth import Authenticator, is_loopback
from fleet.dashboard.headers import SecurityHeaders
from fleet.dashboard.service import DashboardService
from fleet.errors import FleetError
from fleet.whatif import WhatIf


class UnsafeBindError(FleetError):
    exit_code = 2


class PortTakenError(FleetError):
    exit_code = 1


def bind_listener(address: str, port: int) -> socket.socket:
    """The dashboard's listening socket, bound before anything announces its URL: a taken
    port is then an error naming it, not a printed URL that leads to someone else's
    server; port 0 takes a free one. SO_REUSEADDR, as uvicorn's own bind; listening at
once, so a client that reads the URL and connects is queued, not refused."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on accepted sockets whose
    # listener says proto TCP, and with proto 0 every answer waited out Nagle and the
    # client's delayed ACK, 40 ms each (bench/dashboard_pages.py: 48 ms for any page).
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(2048)  # uvicorn's backlog: connections queue until its loop runs
    except OSError as exc:
        sock.close()
        raise PortTakenError(f"cannot serve the dashboard on {address}:{port}: "
                             f"{exc.strerror or exc} (pass another --port)") from None
    sock.set_inheritable(True)
    return sock


def normalize_prefix(prefix: str | None) -> str:
    prefix = (prefix or "").strip().strip("/")
    return f"/{prefix}" if prefix else ""


def build_asgi(svc: DashboardService, url_prefix: str = ""):
    from fleet.dashboard.api import create_api

    api = create_api(svc)
    prefix = normalize_prefix(url_prefix)
    if not prefix:
        return SecurityHeaders(api)

    async def to_prefix(_request):
        return RedirectResponse(f"{prefix}/")

    return SecurityHeaders(Starlette(routes=[Route("/", to_prefix), Mount(prefix, app=api)]))


def check_bind(address: str, svc: DashboardService, insecure: bool) -> None:
    if not svc.auth.enabled and not is_loopback(address) and not insecure:
        raise UnsafeBindError(
            f"refusing to serve the dashboard on {address} without authentication: anyone "
            "who can reach it could stop workers and revoke tasks. Configure "
            "dashboard.users, dashboard.tokens or dashboard.oidc in queues.yaml, bind to "
            "127.0.0.1, or pass --insecure-no-auth if something in front of it "
            "authenticates.")


class DashboardServer:
    """uvicorn in a thread (for ``fleet up`` and tests) or in the foreground."""

    def __init__(self, config: FleetConfig, *, address: str = "127.0.0.1", port: int = 5555,
                 url_prefix: str = "", database: str | None = None, insecure: bool = False,
                 log_level: str = "warning", auth: Authenticator | None = None,
                 whatif: WhatIf | None = None):
        self.svc = DashboardService(config, database, auth, whatif)
        check_bind(address, self.svc, insecure)
        self.listener = bind_listener(address, port)
        self.address, self.port = address, self.listener.getsockname()[1]
        self.prefix = normalize_prefix(url_prefix)
        self.server = uvicorn.Server(uvicorn.Config(
            build_asgi(self.svc, self.prefix), host=address, port=self.port,
            log_level=log_level, access_log=False, lifespan="off", proxy_headers=True,
            forwarded_allow_ips=list(config.dashboard.trusted_proxies)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address
        return f"http://{host}:{self.port}{self.prefix}/"

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.listener])
        finally:
            self.listener.close()

    def serve_forever(self) -> None:
        self.svc.start()
        try:
            self._serve()
        finally:
            self.svc.stop()

    def start(self) -> DashboardServer:
        self.svc.start()
        self._thread = threading.Thread(target=self._serve, name="dashboard-http",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.listener.close()
        self.svc.stop()


logging.getLogger("fleet.dashboard").addHandler(logging.NullHandler())
