"""Serving explore's app: a listening socket that fails early and clearly, uvicorn in the
foreground (the command) or in a thread (tests, benchmarks)."""
from __future__ import annotations

import socket
import threading
import time

from tfrecords_tools.errors import UserInputError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserInputError saying why not (a port in use, an unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserInputError(f"--host {host}: not an address of this machine "
                             f"({err.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without
    # it each kept-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = " (in use: choose another --port)" if err.errno in (98, 48) else ""
        raise UserInputError(f"cannot listen on {host}:{port}: {err.strerror}{hint}.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def _server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def serve(app, host: str = "127.0.0.1", port: int = 8080, ready=None, sock=None) -> None:
    """Serve `app` with uvicorn until interrupted; `ready(url)` is called once listening.
    `sock`: a socket from `bind(host, port)` made earlier (to fail fast on a busy port)."""
    sock = sock or bind(host, port)
    port = sock.getsockname()[1]
    server = _server(app)
    if ready is not None:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{port}")
    server.run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as url:` the app served by uvicorn in a thread (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __exit__(self, *exc):
        self.stop()
