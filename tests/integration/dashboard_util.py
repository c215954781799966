"""A dashboard a test starts in-process on a free port, on its own database."""

from __future__ import annotations

from dataclasses import dataclass

import requests

from fleet.dashboard.server import DashboardServer
from tests.conftest import wait_for


@dataclass
class RunningDashboard:
    server: DashboardServer
    base: str
    session: requests.Session

    @property
    def svc(self):
        return self.server.svc

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.base + path, timeout=15, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(self.base + path, timeout=15, **kw)

    def json(self, path: str, **kw):
        reply = self.get(path, **kw)
        assert reply.status_code == 200, (path, reply.status_code, reply.text)
        return reply.json()

    def stop(self) -> None:
        self.server.stop()
        self.session.close()


def start_dashboard(config, database: str, url_prefix: str = "", auth=None,
                    address: str = "127.0.0.1", whatif=None) -> RunningDashboard:
    # Port 0: the server binds a free port itself, before it is started (no race with
    # another test for a port picked earlier).
    server = DashboardServer(config, address=address, port=0, url_prefix=url_prefix,
                             database=database, auth=auth, whatif=whatif).start()
    base = f"http://127.0.0.1:{server.port}{server.prefix}"
    session = requests.Session()

    def up():
        try:
            return session.get(base + "/healthcheck", timeout=2).ok
        except requests.ConnectionError:
            return False

    wait_for(up, 20, what="the dashboard to answer")
    return RunningDashboard(server, base, session)


FAST = {"dashboard": {"flush_interval": "0.2s", "sample_interval": "0.5s",
                      "offline_after": "4s", "purge_offline_after": "3s"}}
