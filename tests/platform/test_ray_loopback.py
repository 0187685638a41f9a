"""A local Ray cluster that prism starts listens on loopback only (issue: Ray's defaults put
GCS, raylet, workers and agents on every interface, and Ray runs whatever code reaches them),
with Ray's token authentication on and without its notice."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process (the test session may hold its own Ray): start Ray as prism does, run a
# task so that a worker exists, then list every listening TCP socket of the driver's process
# tree (GCS, raylet, workers, agents, dashboard).
_PROBE = """
import json, os, psutil, ray
from common.ray_local import init_ray
init_ray(num_cpus=1, log_to_driver=False, configure_logging=False, **json.loads(os.environ["KW"]))
ray.get(ray.remote(lambda: 1).remote())
tree = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
tree[os.getpid()] = "driver"
socks = [(c.laddr.ip, c.laddr.port, tree[c.pid]) for c in psutil.net_connections("inet")
         if c.status == psutil.CONN_LISTEN and c.pid in tree]
from ray._raylet import AuthenticationMode, get_authentication_mode
token = get_authentication_mode() == AuthenticationMode.TOKEN
ray.shutdown()
print(json.dumps({"socks": socks, "token": token}))
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


@pytest.mark.parametrize("kwargs", [{"include_dashboard": False}, {}],
                         ids=["no-dashboard", "ray-defaults"])
def test_a_local_cluster_listens_on_loopback_only(kwargs):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**env, "KW": json.dumps(kwargs)})
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    socks = probe["socks"]
    names = {name for _, _, name in socks}
    assert "gcs_server" in names and "raylet" in names, socks  # the probe sees the cluster
    exposed = [s for s in socks if not _loopback(s[0])]
    assert not exposed, f"Ray sockets on non-loopback addresses: {exposed}"
    assert probe["token"], "the local cluster runs without token authentication"
    assert "Token authentication is enabled" not in out.stderr, out.stderr[-2000:]
