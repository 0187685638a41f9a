"""Direct ingress: the ingress replica answers HTTP itself, without Ray Serve's HTTP proxy.

By default a request goes client -> HTTP proxy actor -> ingress replica -> sampler replica and
back: two actor hops each way, and one proxy process that every request and answer passes
through in turn. Ray Serve (2.56 and later) can let the ingress replica run its own HTTP server
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, which also sends the calls between replicas over gRPC):
one hop fewer each way. The replica takes its port from a range set by environment variables
that Ray Serve reads when it is imported, in every Ray process: they must be set before Ray
starts and before ``ray.serve`` is imported, hence this module imports no Ray.

``prism serve --direct-ingress`` uses it on one machine: one ingress replica listens on the
requested port; the proxy (still started, as a fallback) moves to a free port. On a cluster,
set the variables of :func:`direct_ingress_env` on every node and put HAProxy in front of the
ingress replicas (``RAY_SERVE_ENABLE_HA_PROXY=1``, see ``docs/guide/serving.md``).
"""

from __future__ import annotations

import os
import socket
import sys


def direct_ingress_env(port: int, replicas: int = 1, drain_s: float = 2.0) -> dict[str, str]:
    """Environment for direct ingress with the ingress replica(s) on ``port`` (and up).

    ``drain_s``: how long a stopping ingress replica keeps its port open for load balancers
    to notice (Ray's default, 30 s, would make every local stop take that long)."""
    if not 1 <= port <= 65535 - replicas:
        raise ValueError(f"port must be in 1..{65535 - replicas}, got {port}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + replicas),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(drain_s),
    }


def enable_direct_ingress(port: int, replicas: int = 1, drain_s: float = 2.0) -> None:
    """Set :func:`direct_ingress_env` in this process (inherited by the Ray it starts).

    Raises RuntimeError when ``ray.serve`` is already imported here: its settings were read
    at import and would disagree with the Ray processes started afterwards."""
    if "ray.serve" in sys.modules:
        raise RuntimeError("direct ingress must be enabled before ray.serve is imported "
                           "(start a fresh process)")
    os.environ.update(direct_ingress_env(port, replicas, drain_s))


def config_port(path: str | os.PathLike[str]) -> int:
    """The HTTP port of a Serve config file (``http_options.port``, Ray's default 8000),
    read without importing Ray."""
    import yaml

    cfg = yaml.safe_load(open(path).read()) or {}
    return int((cfg.get("http_options") or {}).get("port", 8000))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for the fallback proxy)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
