"""Resolving model references and loading models for serving (safetensors + JSON only).

A reference is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the MLflow registry;
``NAME@ALIAS`` and ``NAME/VERSION`` are accepted as short forms), ``runs:/RUN_ID/PATH``, or a
local model directory (only from the service configuration, never from a request).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.models import load_model
from components.cuda_graphs import use_cuda_graphs
from components.generate import GenerativeModel

_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?$")


class ModelNotFound(LookupError):
    """The named model, alias or version does not exist, or is not served here."""


class ModelLoading(LookupError):
    """The model is being loaded for an earlier request."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def normalize_uri(ref: str, allow_local: bool = True) -> str:
    """A model reference in canonical form (``models:/...``, ``runs:/...`` or an absolute
    directory)."""
    ref = ref.strip()
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if allow_local and (ref.startswith((".", "/", "~")) or Path(ref).expanduser().is_dir()):
        return str(Path(ref).expanduser().resolve())
    return f"models:/{ref}"


def resolve_registry(uri: str) -> tuple[str, str, list[str]]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version, aliases).

    Raises ModelNotFound for an unknown model, alias or version.
    """
    # deferred: mlflow (~1 s to import) only for registry URIs, not for local model directories
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _REGISTRY.match(uri)
    if match is None:
        raise ModelNotFound(f"malformed registry reference {uri!r}: expected "
                            "models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient()
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, version)
        else:
            latest = client.search_model_versions(f"name='{name}'", max_results=1,
                                                  order_by=["version_number DESC"])
            if not latest:
                raise ModelNotFound(f"registered model {name!r} has no versions")
            mv = latest[0]
    except MlflowException as exc:
        raise ModelNotFound(f"model {uri!r} not found in the registry: "
                            f"{str(exc).splitlines()[0]}") from exc
    return name, str(mv.version), [f"{name}@{a}" for a in (mv.aliases or [])]


def load_served_model(uri: str, device: str, cuda_graphs: bool = False
                      ) -> tuple[GenerativeModel, dict[str, Any]]:
    """Load ``uri`` onto ``device``; return the model and its description for /v1/models.

    ``cuda_graphs``: on CUDA, run the network's forward passes as recorded CUDA graphs
    (``components.cuda_graphs``; standard models, not Scale Space ones)."""
    aliases: list[str] = []
    load_uri = uri
    if uri.startswith("models:/"):
        name, version, aliases = resolve_registry(uri)
        load_uri = f"models:/{name}/{version}"  # pin the version the alias pointed to
        aliases = sorted({*aliases, uri.removeprefix("models:/"), name, uri, load_uri})
    elif uri.startswith("runs:/"):
        name, version = uri, uri.split("/")[1]
    else:
        path = Path(uri)
        if not path.is_dir():
            raise ModelNotFound(f"model directory {uri} does not exist")
        name, version = path.name, "local"
    model = load_model(load_uri, device)
    model.net.train(False)
    graphed = cuda_graphs and str(device).startswith("cuda") and model.kind == "standard"
    if graphed:
        model.net = use_cuda_graphs(model.net)
    info = {
        "name": name, "uri": uri, "version": version, "aliases": aliases or [uri, name],
        "kind": model.kind, "resolution": model.resolution, "in_channels": model.in_channels,
        "num_classes": model.num_classes, "prediction": model.prediction, "device": device,
        "cuda_graphs": graphed,
    }
    return model, info


@dataclass
class Loaded:
    """A model on its device and its description (an entry of ``/v1/models``)."""

    model: GenerativeModel
    info: dict[str, Any]


Loader = Callable[[str, str, bool], tuple[GenerativeModel, dict[str, Any]]]


class ModelCache:
    """The default model and up to ``max_models - 1`` others, by canonical reference.

    Another model is loaded on its first request, only when ``allow_other`` and only from
    the registry (``models:/``: a request never names a directory); the least recently used
    one makes room, never the default. ``load`` is :func:`load_served_model` or a stand-in
    with its signature."""

    def __init__(self, default_uri: str, device: str, *, max_models: int = 2,
                 allow_other: bool = True, cuda_graphs: bool = False,
                 load: Loader = load_served_model) -> None:
        self.default_uri, self.device = normalize_uri(default_uri), device
        self.max_models, self.allow_other, self.cuda_graphs = max_models, allow_other, cuda_graphs
        self._load = load
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self.loading: set[str] = set()
        self._lock = threading.Lock()  # loads run in worker threads

    @property
    def ready(self) -> bool:
        """Whether the default model is loaded (the replica can answer)."""
        return self.default_uri in self.models

    def load(self, uri: str) -> Loaded:
        """Load ``uri`` (canonical) now and keep it, evicting the least recently used other."""
        loaded = Loaded(*self._load(uri, self.device, self.cuda_graphs))
        with self._lock:
            self.models[uri] = loaded
            while len(self.models) > self.max_models:
                old = next(k for k in self.models if k != self.default_uri)
                self.models.pop(old)
        return loaded

    async def get(self, ref: str | None) -> Loaded:
        """The model that ``ref`` names (None or an alias of the default: the default),
        loaded in a worker thread on first use. Raises ModelNotFound or ModelLoading."""
        default = self.models.get(self.default_uri)
        if ref is None or (default is not None and ref in default.info["aliases"]):
            ref = self.default_uri
        uri = normalize_uri(ref)
        if uri in self.models:
            self.models.move_to_end(uri)
            return self.models[uri]
        if uri in self.loading:
            raise ModelLoading(f"model {uri} is still loading")
        if not self.allow_other or not uri.startswith("models:/"):
            raise ModelNotFound(f"model {ref!r} is not served here")
        self.loading.add(uri)
        try:
            return await asyncio.to_thread(self.load, uri)
        finally:
            self.loading.discard(uri)

    def describe(self) -> list[dict[str, Any]]:
        """``/v1/models``: every loaded model, and the default one first while it loads."""
        out = [dict(lm.info, loaded=True) for lm in self.models.values()]
        if not self.ready:
            out.insert(0, {"name": self.default_uri, "uri": self.default_uri, "version": "",
                           "loaded": False})
        return out
