"""Direct ingress parts (``serving/direct.py``) without Ray: the shared socket, the server that
waits for its replica, the config it is switched on by. The service end to end is
``test_serve_cli.py``'s slow test."""

from __future__ import annotations

import asyncio
import socket
import sys

import httpx
import pytest
from fastapi import FastAPI

from serving.direct import (
    DirectServer,
    check_port_free,
    enable_throughput_mode,
    shared_socket,
    throughput_env,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shared_socket_lets_several_listeners_bind_one_port():
    port = _free_port()
    a, b = shared_socket("127.0.0.1", port), shared_socket("127.0.0.1", port)
    try:
        assert a.getsockname()[1] == b.getsockname()[1] == port
    finally:
        a.close()
        b.close()


def test_a_port_that_is_listened_on_is_not_free_even_for_sharers():
    """A second service must not start on a port that the replicas of another one share."""
    port = _free_port()
    check_port_free("127.0.0.1", port)
    held = shared_socket("127.0.0.1", port)
    try:
        with pytest.raises(RuntimeError, match="already in use"):
            check_port_free("127.0.0.1", port)
    finally:
        held.close()
    check_port_free("127.0.0.1", port)


def test_start_refuses_a_taken_port_before_ray_starts():
    import ray

    from serving.direct import PortInUse
    from serving.launch import load_config, start

    ray_was_up = ray.is_initialized()  # other tests in this process may have started it
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        cfg = load_config(port=other.getsockname()[1])
        with pytest.raises(PortInUse, match="already in use"):
            start(cfg)
    assert ray.is_initialized() == ray_was_up  # refused before Ray would start


def test_shared_socket_names_a_port_held_by_another_program():
    with socket.socket() as plain:  # no SO_REUSEPORT: the port is not shareable
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot bind 127.0.0.1:{port}"):
            shared_socket("127.0.0.1", port)
    with pytest.raises(ValueError, match="port"):
        shared_socket("127.0.0.1", 70000)


def _app(name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/who")
    async def who() -> dict[str, str]:
        return {"server": name}

    return app


def test_direct_servers_share_the_port_and_accept_only_once_ready():
    """Two servers on one port both answer (the kernel spreads new connections); one that is
    not ready yet holds its connections in the backlog and answers them once ready."""
    port = _free_port()

    async def main() -> tuple[set[str], str]:
        ready = {"b": False}
        a = DirectServer(_app("a"), "127.0.0.1", port)
        b = DirectServer(_app("b"), "127.0.0.1", port, ready=lambda: ready["b"])
        a.start()
        b.start()
        try:
            seen: set[str] = set()
            for _ in range(40):  # new connections each time: some reach b's backlog
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                    task = asyncio.create_task(c.get("/who", timeout=10))
                    done, _ = await asyncio.wait({task}, timeout=0.3)
                    # the first request still waiting is in b's backlog: b has served nothing
                    # yet; once b is ready, a slow answer (a busy machine) proves nothing
                    if not done and not ready["b"]:
                        assert "b" not in seen
                        ready["b"] = True
                    seen.add((await task).json()["server"])
            return seen, "ok"
        finally:
            a.stop()
            b.stop()
            await asyncio.gather(a.task, b.task, return_exceptions=True)

    seen, _ = asyncio.run(main())
    assert seen == {"a", "b"}


def test_direct_server_needs_a_running_loop():
    with pytest.raises(RuntimeError, match="running event loop"):
        DirectServer(_app("a"), "127.0.0.1", _free_port()).start()


def test_throughput_settings_are_left_alone_once_ray_serve_is_imported(monkeypatch):
    env = throughput_env()
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    monkeypatch.setitem(sys.modules, "ray.serve", sys.modules.get("ray.serve", object()))
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    assert enable_throughput_mode() is False
    import os

    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ


def test_direct_ingress_config():
    from serving.app import AppArgs
    from serving.launch import direct_ingress, load_config, with_ingress_replicas

    cfg = load_config(port=8123, host="127.0.0.2")
    d = direct_ingress(cfg, 3)
    assert d["proxy_location"] == "Disabled"
    app = d["applications"][0]
    assert app["args"]["direct_http"] == {"host": "127.0.0.2", "port": 8123}
    ingress = next(x for x in app["deployments"] if x["name"] == "Ingress")
    assert ingress["num_replicas"] == 3 and "autoscaling_config" not in ingress
    assert cfg.get("proxy_location") == "HeadOnly"  # the input is left as it was
    assert AppArgs.model_validate(app["args"]).direct_http.port == 8123
    with pytest.raises(ValueError, match="port"):
        AppArgs.model_validate({**app["args"], "direct_http": {"port": 0}})
    with pytest.raises(ValueError, match=">= 1"):
        with_ingress_replicas(cfg, 0)
    # an autoscaled Ingress: its autoscaler would not see direct traffic, so max_replicas
    auto = load_config(port=8123)
    dep = next(x for x in auto["applications"][0]["deployments"] if x["name"] == "Ingress")
    dep.pop("num_replicas", None)
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 5}
    fixed = direct_ingress(auto)["applications"][0]["deployments"]
    ingress = next(x for x in fixed if x["name"] == "Ingress")
    assert ingress["num_replicas"] == 5 and "autoscaling_config" not in ingress
    plain = direct_ingress(cfg)["applications"][0]["deployments"]
    assert next(x for x in plain if x["name"] == "Ingress")["num_replicas"] == 2  # the config's


def test_an_ingress_replica_whose_server_stopped_fails_its_health_check():
    """Serve replaces an unhealthy replica; one that no longer serves HTTP must say so."""
    from types import SimpleNamespace

    from serving.app import Ingress

    check = Ingress.func_or_class.check_health

    async def finished() -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await task
        return task

    done = asyncio.run(finished())
    check(SimpleNamespace(_direct=None))  # behind the proxy: nothing to check
    check(SimpleNamespace(_direct=SimpleNamespace(task=None)))
    with pytest.raises(RuntimeError, match="HTTP server stopped"):
        check(SimpleNamespace(_direct=SimpleNamespace(task=done)))
