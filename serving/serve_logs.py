"""One known-benign Ray Serve warning, left out of what this driver prints of the cluster's logs.

Ray Serve's controller deregisters the autoscaling state of every deployment that has no
``autoscaling_config`` when it deploys or deletes it (``DeploymentState.deploy`` and the
cleanup step of ``DeploymentStateManager.update`` in Ray 2.60). Where another deployment of the
same application autoscales, as prism's ``Sampler`` does beside its fixed-count ``Ingress``,
the application has an autoscaling state, the fixed-count deployment was never in it, and the
controller logs ``Cannot deregister autoscaling state for deployment ... because it is not
registered`` at WARNING: once when the service starts and once when it stops. Nothing is wrong,
and no setting of the deployments avoids it short of autoscaling every one of them.

That line is logged in the controller's process; the driver (``prism serve``) prints it among
the lines Ray forwards from the cluster's processes. :func:`drop_benign_serve_warnings` puts a
filter in front of Ray's printer for those lines: it leaves out exactly that message from the
Serve controller and passes everything else, other warnings of the controller included, as it
was. The controller's own log file (``logs/serve/controller_*.log``) keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

try:  # Ray's dispatcher of the lines forwarded to the driver: a private name of Ray 2.60
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as _dispatcher
except ImportError:  # another Ray: its lines are printed as they are
    _dispatcher = None

# "WARNING 2026-01-01 00:00:00,000 controller 123 -- Cannot deregister ..." (Serve's log format:
# level, time, component, its id, message), from the actor named ServeController
_CONTROLLER = "ServeController"
BENIGN = re.compile(
    r"^WARNING .* controller \d+ -- Cannot deregister autoscaling state for deployment "
    r"Deployment\(name='[^']*', app='[^']*'\) because it is not registered\s*$")
_PRINTER = "ray_print_logs"  # the name Ray gives its printer of forwarded lines


def benign(data: dict[str, Any], line: str) -> bool:
    """Whether ``line`` of a batch ``data`` forwarded by Ray is the benign warning."""
    return data.get("actor_name") == _CONTROLLER and BENIGN.match(line) is not None


def without_benign(printer: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``printer`` of forwarded batches, given each batch without its benign lines."""

    def filtered(data: dict[str, Any]) -> None:
        lines = [ln for ln in data.get("lines", []) if not benign(data, ln)]
        if lines or not data.get("lines"):
            printer({**data, "lines": lines})

    filtered.prism_filtered = True  # type: ignore[attr-defined]
    return filtered


def drop_benign_serve_warnings() -> bool:
    """Put the filter in front of Ray's printer of forwarded lines in this process. Nothing
    happens where Ray prints none (``log_to_driver=False``), where it is already there, or
    where this Ray has no such printer. Returns whether the filter is in place. Ray removes its
    printer, filter and all, in ``ray.shutdown()``."""
    if _dispatcher is None:
        return False
    try:
        with _dispatcher._lock:
            for i, (name, printer) in enumerate(_dispatcher.handlers):
                if name == _PRINTER:
                    if not getattr(printer, "prism_filtered", False):
                        _dispatcher.handlers[i] = (name, without_benign(printer))
                    return True
    except AttributeError:  # a dispatcher of another shape
        pass
    return False
