"""``serving/serve_logs.py``: of the lines Ray forwards to the driver, the Serve controller's
benign "Cannot deregister autoscaling state" warning is left out and everything else printed.
(``test_serve_cli.py``'s slow tests check a real service's output from start to stop.)"""

from __future__ import annotations

from serving.serve_logs import drop_benign_serve_warnings, without_benign

BENIGN = ("WARNING 2026-12-07 02:39:10,079 controller 17834 -- Cannot deregister autoscaling "
          "state for deployment Deployment(name='Ingress', app='prism') because it is not "
          "registered")
INFO = ("INFO 2026-12-07 02:39:10,078 controller 17834 -- Deregistering autoscaling state for "
        "deployment Deployment(name='Ingress', app='prism')")
OTHER = ("WARNING 2026-12-07 02:39:40,001 controller 17834 -- Deployment 'Sampler' in "
         "application 'prism' has 1 replicas that have taken more than 30s to initialize.")


def _batch(actor: str, *lines: str) -> dict:
    return {"ip": "127.0.0.1", "pid": 17834, "actor_name": actor, "task_name": None,
            "is_err": True, "lines": list(lines)}


def _printed(data: dict) -> list[dict]:
    got: list[dict] = []
    without_benign(got.append)(data)
    return got


def test_the_controllers_benign_warning_is_left_out_and_the_rest_printed():
    got = _printed(_batch("ServeController", INFO, BENIGN, OTHER))
    assert [b["lines"] for b in got] == [[INFO, OTHER]]
    assert got[0]["actor_name"] == "ServeController" and got[0]["pid"] == 17834
    assert _printed(_batch("ServeController", BENIGN)) == []  # nothing left: nothing printed


def test_the_same_text_from_another_process_or_reworded_is_printed():
    for data in (_batch("SomeActor", BENIGN), _batch("ServeController", "x " + BENIGN),
                 _batch("ServeController", BENIGN.replace("WARNING", "ERROR"))):
        assert _printed(data) == [data]


def test_the_filter_goes_in_front_of_rays_printer_once():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    got: list[dict] = []
    saved, dispatcher.handlers = dispatcher.handlers, []  # Ray's own printers, kept
    try:
        assert not drop_benign_serve_warnings()  # no printer (log_to_driver=False): nothing
        dispatcher.add_handler("ray_print_logs", got.append)
        assert drop_benign_serve_warnings() and drop_benign_serve_warnings()
        dispatcher.emit(_batch("ServeController", BENIGN, OTHER))
        assert [b["lines"] for b in got] == [[OTHER]]  # filtered once, printed once
    finally:
        dispatcher.handlers = saved
