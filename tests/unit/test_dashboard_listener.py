"""The dashboard's own listening socket (bound before its URL is printed)."""

from __future__ import annotations

import socket

from fleet.dashboard.server import PortTakenError, bind_listener


def test_the_listener_says_tcp_so_asyncio_turns_nagle_off_for_each_connection():
    """asyncio sets TCP_NODELAY on an accepted socket only when the listener's proto is
    IPPROTO_TCP. A listener made with proto 0 served every answer 40 ms late (Nagle
    against the client's delayed ACK): bench/dashboard_pages.py measured 48 ms for every
    page, 2-5 ms with this."""
    for address in ("127.0.0.1", "::1"):
        try:
            sock = bind_listener(address, 0)
        except PortTakenError:  # no IPv6 loopback on this machine: IPv4 was checked
            assert address == "::1"
            continue
        try:
            assert sock.type == socket.SOCK_STREAM
            assert sock.proto == socket.IPPROTO_TCP
        finally:
            sock.close()
