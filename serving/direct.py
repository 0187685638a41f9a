"""Direct ingress: the ``Ingress`` replicas answer HTTP themselves, all on one shared port.

By default a request goes client -> HTTP proxy actor -> ingress replica -> sampler replica and
back: two actor hops each way, and one proxy process that every request and answer passes
through in turn. With direct ingress each ``Ingress`` replica binds the service's own
host:port with ``SO_REUSEPORT`` and runs the FastAPI app in its event loop (uvicorn); the
kernel spreads the clients' connections over the replicas, so N replicas parse requests and
encode answers in parallel, with no proxy process in the path. Ray Serve's proxy is not
started (``proxy_location: Disabled``); the replicas are still Serve replicas (started,
health-checked, replaced and scaled by Serve) and call the ``Sampler`` through its handle.

``prism serve --direct-ingress [--ingress-replicas N]`` uses it on one host. A replica binds
its socket in its constructor (a clear error if another program holds the port) and accepts
connections once Serve has finished initialising it. On a cluster, run the ingress replicas on
the nodes that clients reach (one per core to spare) or put any TCP load balancer in front.

Optionally Ray Serve's throughput-optimized settings (:func:`throughput_env`: handle calls
over gRPC, user code on the replica's own event loop, buffered request logs) cut the per-call
cost further; Ray reads them when it is imported, so they are set before Ray starts. This
module imports no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("ray.serve")


def throughput_env() -> dict[str, str]:
    """Ray Serve's throughput-optimized mode without its own direct ingress (ours binds the
    port)."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def enable_throughput_mode() -> bool:
    """Set :func:`throughput_env` in this process (inherited by the Ray it starts). Returns
    False, changing nothing, when ``ray.serve`` is already imported here (its settings were
    read at import and would disagree with Ray processes started afterwards)."""
    if "ray.serve" in sys.modules:
        return False
    os.environ.update(throughput_env())
    return True


def shared_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other processes may bind too
    (``SO_REUSEPORT``: the kernel spreads new connections over all of them)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("direct ingress needs SO_REUSEPORT (Linux, BSD, macOS)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"direct ingress cannot bind {host}:{port}: {exc.strerror} (another "
                           "program holds the port without SO_REUSEPORT?)") from exc
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class PortInUse(RuntimeError):
    """Something already listens on the service's port."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` when something already listens on ``host:port``: Serve's
    proxy could not bind it, and a direct-ingress service (whose replicas share their port)
    would silently get part of the other one's connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"{host}:{port} is already in use ({exc.strerror}): stop the "
                               "service there or choose another --port") from exc


def _server_class() -> type:
    # deferred: uvicorn (~25 ms) only for the direct ingress; the CLI imports this module for
    # --help
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its signal handlers: the replica process's signals are Ray's."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server


class DirectServer:
    """An ASGI app served by uvicorn on a shared socket, in the current event loop.

    ``start()`` binds at once and accepts connections once ``ready()`` is true (polled every
    10 ms): the replica's constructor binds, Serve finishes initialising it, then it serves.
    Connections that arrive in between wait in the socket's backlog."""

    def __init__(self, app: Any, host: str, port: int,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.app, self.host, self.port, self.ready = app, host, port, ready
        self.sock: socket.socket | None = None
        self.server: Any = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Bind now; serve from a task of the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as exc:
            raise RuntimeError("DirectServer.start() must be called in a running event loop "
                               "(the Serve replica's)") from exc
        import uvicorn

        self.sock = shared_socket(self.host, self.port)
        http = "httptools" if _has("httptools") else "h11"
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_config=None,
                                log_level="warning", http=http, ws="none", loop="none",
                                timeout_keep_alive=60)
        self.server = _server_class()(config)
        self.task = loop.create_task(self._serve())

    async def _serve(self) -> None:
        while not self.ready():
            await asyncio.sleep(0.01)
        log.info("direct ingress: pid %d serving on %s:%d", os.getpid(), self.host, self.port)
        try:
            await self.server.serve(sockets=[self.sock])
        except Exception:
            log.exception("direct ingress server on %s:%d stopped", self.host, self.port)
            raise

    def stop(self) -> None:
        """Stop accepting and finish: the other replicas keep the port."""
        if self.server is not None:
            self.server.should_exit = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
