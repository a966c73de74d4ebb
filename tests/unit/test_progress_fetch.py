"""The operator's /progress fetch against a real, misbehaving local HTTP server: it returns within
its total deadline whatever the trainer does, and never follows a redirect."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kubetune_operator.observe import fetch_progress

OK = b'{"phase": "training", "step": 3}'


def _reply(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """serve(behaviour) -> port: each connection is handed to behaviour(conn) in its own thread."""
    listeners: list[socket.socket] = []

    def serve(behaviour: Callable[[socket.socket], None]) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        listeners.append(srv)

        def loop() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.recv(4096)

                def run(c: socket.socket = conn) -> None:
                    try:
                        behaviour(c)
                    except OSError:
                        pass
                    finally:
                        c.close()

                threading.Thread(target=run, daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return srv.getsockname()[1]

    yield serve
    for srv in listeners:
        srv.close()


def timed(port: int, **kw) -> tuple[object, float]:
    t0 = time.monotonic()
    result = fetch_progress("127.0.0.1", port, **kw)
    return result, time.monotonic() - t0


def test_a_good_reply(server):
    port = server(lambda c: c.sendall(_reply(OK)))
    assert timed(port)[0] == {"phase": "training", "step": 3}


def test_a_drip_is_cut_at_the_total_deadline(server):
    def drip(c: socket.socket) -> None:
        for byte in _reply(OK):
            c.sendall(bytes([byte]))
            time.sleep(0.3)  # each byte well inside any per-read timeout

    result, took = timed(server(drip), deadline=1.0)
    assert result is None and took < 1.6, took


def test_a_silent_server_is_cut_at_the_deadline(server):
    result, took = timed(server(lambda c: time.sleep(5)), deadline=0.5)
    assert result is None and took < 1.1, took


def test_a_huge_body_is_not_read(server):
    def huge(c: socket.socket) -> None:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(10000):
            c.sendall(chunk)

    result, took = timed(server(huge), max_bytes=64 * 1024)
    assert result is None and took < 2.5


def test_a_redirect_is_not_followed(server):
    reached = threading.Event()
    target = server(lambda c: (reached.set(), c.sendall(_reply(OK))))
    port = server(lambda c: c.sendall(_reply(b"", "302 Found", f"Location: http://127.0.0.1:{target}/progress\r\n")))
    assert timed(port)[0] is None
    time.sleep(0.2)
    assert not reached.is_set()


@pytest.mark.parametrize(
    "garbage", [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\xff\x13garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\n"]
)
def test_a_reply_that_is_not_http_or_not_json(server, garbage):
    port = server(lambda c: c.sendall(garbage))
    assert timed(port)[0] is None
    port = server(lambda c: c.sendall(_reply(b"<html>not json</html>")))
    assert timed(port)[0] is None


def test_liveness_fails_when_the_sweep_is_stuck():
    import asyncio

    from kubetune_operator.context import OperatorContext
    from kubetune_operator.reconcile import SWEEP_STUCK_SECONDS, sweep_stuck
    from kubetune_operator.settings import Settings

    async def run() -> None:
        ctx = OperatorContext.create(Settings(progress_poll_seconds=10))
        assert sweep_stuck(ctx, time.monotonic() + 10**6) is None  # no sweep yet: nothing to be stuck
        ctx.sweeper = asyncio.create_task(asyncio.sleep(60))
        ctx.sweep_beat = time.monotonic()
        assert sweep_stuck(ctx, ctx.sweep_beat + 10 + SWEEP_STUCK_SECONDS - 1) is None
        assert "has not moved" in (sweep_stuck(ctx, ctx.sweep_beat + 10 + SWEEP_STUCK_SECONDS + 1) or "")
        ctx.sweeper.cancel()

    asyncio.run(run())
