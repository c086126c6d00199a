"""Serve an ASGI app (uvicorn) from a background thread next to the gRPC server: the dashboard and
the blob server both run this way."""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable

import uvicorn

from .errors import InvalidArgument


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, certfile: str | os.PathLike | None = None,
                    keyfile: str | os.PathLike | None = None, name: str = "http") -> tuple[int, Callable[[], None]]:
    """Start serving `app`; returns (bound port, stop function). With certfile and keyfile (PEM) it
    serves HTTPS; without, plain HTTP (only safe on 127.0.0.1 or behind a TLS-terminating proxy)."""
    if (certfile is None) != (keyfile is None):
        raise InvalidArgument(f"{name} TLS needs both certfile and keyfile (or neither)")
    tls = {"ssl_certfile": os.fspath(certfile), "ssl_keyfile": os.fspath(keyfile)} if certfile else {}
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, **tls)
    config.load()  # here, not in the thread, so a bad certificate or key raises to the caller
    # Bind here, not in uvicorn, so port=0 yields the real port before the thread starts serving.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"{name} cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"walle-{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError(f"{name} server on {host}:{bound} did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()

    return bound, stop
