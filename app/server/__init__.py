"""`main.py serve`: the runtime behind an OpenAI-compatible HTTP API (Starlette + uvicorn).

    serving = Serving(rt, max_queue=8).start()     # the thread that owns the runtime
    run(serving, host="127.0.0.1", port=8000)      # blocks until Ctrl-C

Loopback only unless told otherwise; any other address needs an API key.
"""
from __future__ import annotations

import ipaddress
import socket
import threading

from app.runtime.types import VramchatError

from .worker import Serving  # noqa: F401  (the public entry points)

KEY_ENV = "VRAMCHAT_API_KEY"


def _addresses(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise VramchatError(f"--host {host}: cannot resolve it ({e.strerror})") from None


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    addrs = _addresses(host, 0)
    return bool(addrs) and all(ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback for a in addrs)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not api_key and not is_loopback(host):
        raise VramchatError(
            f"--host {host} is reachable from other machines, and anyone who can reach it could use "
            f"this model; give an API key (--api-key KEY or the {KEY_ENV} environment variable) "
            "that clients must send, or serve on 127.0.0.1 (the default)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); errors say what to change."""
    if not 0 <= port <= 65535:
        raise VramchatError(f"--port {port}: must be in 0..65535")
    family, kind, proto, _, addr = _addresses(host, port)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise VramchatError(f"cannot listen on {host}:{port}: {e.strerror}"
                            + (" (another server uses it; pick another --port)" if port else "")) from None
    sock.listen(128)  # NOTE: clients may connect before uvicorn starts; they wait in the backlog
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _server(serving: Serving, sock, api_key, log_level: str):
    import uvicorn

    from .app import make_app
    config = uvicorn.Config(make_app(serving, api_key), log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level == "debug")
    return uvicorn.Server(config)


def run(serving: Serving, host: str, port: int, api_key: str | None = None, on_ready=None) -> None:
    """Serve until Ctrl-C. on_ready(url) is called once the socket listens."""
    check_bind(host, api_key)
    sock = bind(host, port)
    try:
        server = _server(serving, sock, api_key, "info")
        if on_ready is not None:
            on_ready(url_of(sock))
        server.run(sockets=[sock])
    finally:
        serving.close()
        sock.close()


class Background:
    """`serve` in a thread of this process, on a random loopback port (tests, `bench serve`).

        with Background(serving) as url: ...   # url: http://127.0.0.1:PORT/v1
    """

    def __init__(self, serving: Serving, api_key: str | None = None, host: str = "127.0.0.1"):
        check_bind(host, api_key)
        self.serving, self.sock = serving, bind(host, 0)
        self.url = url_of(self.sock)
        self.server = _server(serving, self.sock, api_key, "warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="vramchat-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.serving.close()  # stops the running decode, so open streams end and uvicorn can exit
        self.thread.join(timeout=30)
        self.sock.close()
