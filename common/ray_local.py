"""Ray for prism's processes: the cluster ``RAY_ADDRESS`` names, or a local one on loopback.

Ray starts a local node on the machine's outward address: its GCS, raylet, worker, object
manager and agent servers listen there or on every interface, and a Ray cluster runs whatever
code reaches those ports. A single-machine cluster needs none of them outside the host. Ray's
own single-host mode (meant for laptops: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read as "no
multi-node cluster") gives the node 127.0.0.1, and every server then binds loopback only. Ray
has no ``ray.init`` argument for it (``_node_ip_address="127.0.0.1"`` is rewritten to the
outward address), so :func:`init_ray` sets that mode for the process and the ones it starts.
A real cluster is secured as ``docs/guide/cluster.md`` says.

Ray turns token authentication on for a new local cluster when ``RAY_AUTH_MODE`` is unset and
warns at every start that it did. :func:`init_ray` asks for that same mode explicitly, so the
cluster is the same and the warning goes; a mode the user set wins. Ray reads the mode into a
process-wide config when it is imported, so the variable alone comes too late: the config is
refreshed the way Ray refreshes it itself when it enables the mode.
"""

from __future__ import annotations

import os
from typing import Any

SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """Connect to ``address`` (else ``$RAY_ADDRESS``), or start a local cluster whose every
    server, the dashboard included, listens on 127.0.0.1 only. Nothing happens when Ray is
    already initialised in this process. Returns whether this call started or joined Ray."""
    # deferred: ray (~0.3 s to import) only for Ray jobs; training.launch imports this module
    # for local runs too
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ[SINGLE_HOST_ENV] = "0"  # for the node processes this one starts
        from ray._private import ray_constants  # read once, when ray was imported

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        _token_auth_quietly()
    ray.init(address=address, **kwargs)
    return True


def _token_auth_quietly() -> None:
    """Token authentication for the local cluster, as Ray's default gives it, without Ray's
    notice; nothing when the user chose a mode or this Ray has no token authentication."""
    if AUTH_MODE_ENV in os.environ:
        return
    try:
        from ray._raylet import Config
    except ImportError:  # a Ray without token authentication
        return
    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # the cached config reads the mode again
