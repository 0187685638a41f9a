"""``run.cuda_graphs: on``: the eager network's forward and backward recorded as CUDA graphs,
one per input signature (``training.graphs``).

Recording needs a GPU. On the CPU, the recording (``graphs._record_graphs``) is replaced by
a stand-in that returns the module it is given, so that each call runs eagerly through the
binding of its signature: one recording per signature and only one, keyword and ``None``
arguments in their places, several outputs, and gradients reaching the network's parameters,
with the same losses as the plain loop to the last bit. On a GPU the real recording is held
against eager training step by step.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from train_helpers import ROOT  # noqa: E402

from common.run_config import ConfigError, load_config  # noqa: E402
from training import graphs  # noqa: E402
from training.callbacks import Callback  # noqa: E402
from training.launch import run_local  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
RECIPES = {  # every family, and SSD with its several resolution pairs
    "unet-labels": ("debug.yaml", []),
    "ddpm": ("cifar10-ddpm-eps.yaml", ["model.preset=unet-debug"]),
    "dit": ("dit-b2-32.yaml", ["model.preset=dit-debug"]),
    "dimr": ("dimr-32-2r.yaml", ["model.preset=dimr-debug"]),  # a list of outputs
    "ssd": ("ssd-32-3l.yaml", ["model.preset=ssd-debug"]),  # out_resolution=, pairs
}


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_metrics(self, step: int, metrics: dict) -> None:
        self.losses.append(metrics["loss"])


def _train(tmp_path: Path, recipe: str, device: str, sets: list[str]) -> list[float]:
    config, extra = RECIPES[recipe]
    cfg = load_config(CONFIGS / config, [
        f"run.output_dir={tmp_path}", f"run.name={recipe}-{len(list(tmp_path.iterdir()))}",
        f"run.device={device}", "run.compile=off", "data.source=synthetic", "data.url=",
        "data.resolution=16", "data.synthetic_size=64", "data.num_workers=0",
        "train.total_images=48", "train.batch_size=8", "train.log_every_images=8",
        "checkpoint.every_images=100000", "sampling.num_images=0", "tracking.enabled=false",
        "train.count_flops=false", *extra, *sets])
    losses = _Losses()
    run_local(cfg, [losses])
    assert len(losses.losses) == 6
    return losses.losses


@pytest.fixture
def stand_in(monkeypatch):
    """The recording replaced by the module it would record (CPU)."""
    recorded: list[tuple[torch.nn.Module, tuple]] = []

    def record(module, sample, pool, warmup):
        assert pool is not None and warmup >= 1
        recorded.append((module, tuple((tuple(t.shape), t.dtype) for t in sample)))
        return module

    monkeypatch.setattr(graphs, "_record_graphs", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(graphs, "_capturable", lambda tensors: bool(tensors))
    monkeypatch.setattr(graphs, "_recording", contextlib.nullcontext)
    return recorded


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_family_trains_the_same_through_its_recorded_signatures(tmp_path, stand_in,
                                                                       recipe):
    plain = _train(tmp_path, recipe, "cpu", [])
    assert stand_in == []  # off: nothing recorded
    bound = _train(tmp_path, recipe, "cpu", ["run.cuda_graphs=on"])
    assert bound == plain  # to the last bit: the binding passes every argument in its place
    signatures = [s for _, s in stand_in]
    assert len(signatures) == len(set(signatures)) >= 1  # each recorded once, then replayed
    if recipe == "ssd":  # one signature per resolution pair drawn (3 levels: up to 5 pairs)
        assert len({s[0][0] for s in signatures}) >= 2, signatures
    else:
        assert len(signatures) == 1
    # the recorded modules share the network's parameters (gradients reach it)
    params = [{id(p) for p in m.parameters()} for m, _ in stand_in]
    assert all(p == params[0] for p in params)


def test_the_wrapper_calls_the_network_itself_without_gradients(stand_in):
    net = torch.nn.Linear(3, 2)
    g = graphs.use_training_graphs(net)
    assert graphs.use_training_graphs(g) is g and g.in_features == 3  # attributes pass through
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(g(x), net(x), atol=0, rtol=0)
    assert g.graphs == 0 and stand_in == []
    g(x).sum().backward()
    g(x).sum().backward()
    g(torch.randn(5, 3))  # another shape: another recording
    assert g.graphs == 2 and [s[0][0] for _, s in stand_in] == [(4, 3), (5, 3)]
    assert net.weight.grad is not None


class _Toy(torch.nn.Module):
    """Output depends on every kind of argument a network here takes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, c, labels=None, out_resolution=None, shift=None):
        y = self.lin(x) * c
        y = y + (1.0 if labels is None else labels[:, None].float())
        y = y[..., :out_resolution] if out_resolution else y
        y = y if shift is None else y + shift
        return [y, y.square().sum()]


def test_every_argument_reaches_the_network_in_its_place(stand_in):
    net = _Toy()
    g = graphs.use_training_graphs(net)
    x, c, labels, shift = torch.randn(3, 4), torch.randn(3, 1), torch.arange(3), torch.randn(3, 2)
    calls = [((x, c), {}), ((x, c, labels), {}), ((x, c, None), {"out_resolution": 2}),
             ((x, c), {"shift": shift, "out_resolution": 2}),
             ((x, c), {"out_resolution": 2, "shift": shift})]  # the same as the one before
    for args, kwargs in calls:
        got, want = g(*args, **kwargs), net(*args, **kwargs)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        got[1].backward()
        grad = net.lin.weight.grad.clone()
        net.zero_grad()
        want[1].backward()
        torch.testing.assert_close(grad, net.lin.weight.grad, atol=0, rtol=0)
        net.zero_grad()
    assert g.graphs == len(stand_in) == 4  # keyword order is not a new signature


def test_cuda_graphs_need_compile_off_and_no_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="run.compile=off"):
        load_config(CONFIGS / "debug.yaml", ["run.cuda_graphs=on", "run.compile=auto"])
    cfg = load_config(CONFIGS / "debug.yaml", ["run.cuda_graphs=on", "run.compile=off"])
    assert cfg.run.cuda_graphs == "on"  # YAML's boolean `on` read back as the switch
    with pytest.raises(ValueError, match="without gradient accumulation"):
        _train(tmp_path, "unet-labels", "cpu", ["run.cuda_graphs=on", "train.grad_accum=2"])


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@GPU
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recorded_graphs_train_like_the_eager_network_on_a_gpu(tmp_path, recipe):
    eager = _train(tmp_path, recipe, "cuda", [])  # the debug presets have no dropout
    recorded = _train(tmp_path, recipe, "cuda", ["run.cuda_graphs=on"])
    # the same kernels replayed (cuBLAS may pick others while recording), in bf16
    assert recorded[0] == pytest.approx(eager[0], rel=5e-3)  # before any update
    torch.testing.assert_close(torch.tensor(recorded), torch.tensor(eager), rtol=2e-2, atol=1e-3)


class _Tied(torch.nn.Module):
    """Two parameters that autograd hands one gradient tensor, and a list of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.a, self.b = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))

    def forward(self, x, scale=None):
        y = self.lin(x) + self.a + self.b
        return [y, y * (1.0 if scale is None else scale)]


@GPU
def test_recorded_gradients_are_eagers_and_each_parameters_own():
    torch.manual_seed(0)
    net = _Tied().cuda()
    g = graphs.use_training_graphs(net)
    for n in (4, 4, 6, 4):  # recorded, replayed, another signature, the first again
        x = torch.randn(n, 8, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = g(x, scale=2.0)
        (out[0].float().square().mean() + out[1].float().mean()).backward()
        got = {k: p.grad.clone() for k, p in net.named_parameters()}
        assert net.a.grad.data_ptr() != net.b.grad.data_ptr()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)  # in place: a and b apart
        torch.testing.assert_close(net.a.grad, net.b.grad, atol=0, rtol=0)
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, scale=2.0)
        (out[0].float().square().mean() + out[1].float().mean()).backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-2, atol=1e-4, msg=k)
        net.zero_grad(set_to_none=True)
    assert g.graphs == 2
    g(x)[0].sum().backward()  # leaves .grad: a recorded backward refuses to add to it
    with pytest.raises(RuntimeError, match="set_to_none"):
        g(x)[0].sum().backward()


class _Waits(torch.nn.Module):
    """A network that waits for the host in its forward: it cannot be recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = torch.nn.functional.dropout(self.lin(x), 0.1)
        return y * (2.0 if y.sum().item() > 0 else -2.0)


@GPU
def test_a_network_that_cannot_be_recorded_runs_eagerly_and_random_draws_still_work():
    net = _Waits().cuda()
    g = graphs.use_training_graphs(net)
    x = torch.randn(4, 8, device="cuda")
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        g(x).sum().backward()
    assert g.graphs == 0 and net.lin.weight.grad is not None
    net.zero_grad(set_to_none=True)
    g(x).sum().backward()  # the same signature: eagerly again, no second try
    torch.randn(3, device="cuda")  # the generator left capture mode with the failed capture
    assert torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5).eq(0).any()
