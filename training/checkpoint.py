"""Checkpoints: tensors as safetensors, everything else as JSON; atomic; the last K kept.

Layout of one checkpoint directory ``step-00000010/``::

    model.safetensors      raw (unwrapped, uncompiled) network weights
    ema.safetensors        EMA weights
    optimizer.safetensors  AdamW state tensors, keys ``<param index>.<name>``
    state.json             step, images_seen, data position (per rank), RNG states,
                           optimizer hyper-parameters, the resolved config

A checkpoint is written to ``step-XXXXXXXX.tmp-<pid>`` and renamed into place, so a reader
never sees half a checkpoint; ``latest`` ignores temporary directories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as JSON-able lists (torch CPU/CUDA, NumPy, Python)."""
    np_state = np.random.get_state()  # noqa: NPY002 (global state, saved)
    py = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"{pid}.{name}"] = torch.as_tensor(val).detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    opt: torch.optim.Optimizer, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``root/step-XXXXXXXX`` atomically and prune to the last ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    remove_orphans(root)
    tmp.mkdir()
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_contiguous(ema.state_dict()), str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = optimizer_tensors(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    payload = {**state, "optimizer": opt_meta, "rng": rng_state()}
    (tmp / "state.json").write_text(json.dumps(payload, indent=1, default=str))
    if final.exists():  # a rerun of the same step replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_orphans(root: Path) -> list[Path]:
    """Delete ``*.tmp-<pid>`` folders whose writer process is gone (a kill during a save leaves
    one, a model's size each); returns what was removed."""
    gone = []
    for p in root.glob(f"{PREFIX}*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and "." not in p.name and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, ema: torch.nn.Module,
                    opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights, EMA and optimizer state in place; return the JSON state (RNGs restored)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no state.json): {path}")
    state = json.loads((path / "state.json").read_text())
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(device)))
    opt.load_state_dict(optimizer_state(load_file(str(path / "optimizer.safetensors")),
                                        state["optimizer"]))
    match_param_layout(opt)
    set_rng_state(state["rng"])
    return state


def match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor its parameter's strides, in place.

    The file holds contiguous tensors and ``Optimizer.load_state_dict`` keeps them so; the
    fused CUDA AdamW refuses moments whose strides differ from a channels_last parameter's
    ("must have same dtype, device, and layout"), so a resumed run failed at its first step.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for name, val in st.items():
                if torch.is_tensor(val) and val.shape == p.shape and val.stride() != p.stride():
                    st[name] = torch.empty_like(p, dtype=val.dtype).copy_(val)
