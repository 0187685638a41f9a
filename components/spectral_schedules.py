"""Per-image spectral noise schedules and their mixture model (SCIENCE.md section 4).

*Reconstruction, ours.* An image is summarised by a parameter vector (``PARAM_NAMES``)

    params = (log_A, beta, lambda_min, lambda_max)       shape (B, 4), float

from its luminance RAPSD ``S(f) ~ A f^-beta`` and its bounds (``components.spectra``).
Under the power-law model, the frequency whose SNR is 1 at log-SNR lambda is
``f_c(lambda) = (A e^lambda)^(1/beta)``; ``u = lambda - lambda_max <= 0``, ``D = lambda_max -
lambda_min``. Two schedules follow, both with lambda(0) = lambda_max, lambda(1) = lambda_min:

- *frequency-focused*: f_c sweeps linearly in t from f_c(lambda_max) to f_c(lambda_min),
  ``t(u) = (1 - e^(k u)) / (1 - e^(-k D))`` with ``k = 1 / beta``;
- *power-focused*: t is the fraction of the image's (2-D) power drowned by noise, i.e. the
  integral of ``A f^-beta 2 pi f`` above f_c, normalised between the bounds: the same form with
  ``k = (2 - beta) / beta`` (k -> 0, i.e. beta = 2, gives lambda linear in t);
- *mixed*: the average of the two in lambda.
Inverting, ``lambda(t) = lambda_max + log((1 - t) + t e^(-k D)) / k`` (log-sum-exp form).
log_A does not enter the schedules; it is kept for the mixture model and analyses.

``ScheduleModel`` is a Gaussian mixture over parameter vectors (optionally one per class),
fitted with plain NumPy EM, saved as JSON, sampled with a torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

PARAM_NAMES = ("log_A", "beta", "lambda_min", "lambda_max")
KINDS = ("frequency", "power", "mixed")
_K_LINEAR = 1e-6  # |k| below this: the linear-in-lambda limit
# The schedules need beta > 0; a flat or rising spectrum (a star field, noise: measured
# beta <= 0) is given the flattest falling one, whether measured or sampled from the mixture.
BETA_MIN = 0.05


def params_from_stats(stats: dict[str, Any]) -> np.ndarray:
    """(B, 4) parameter vectors from ``image_statistics`` output (or a table with those keys)."""
    cols = [np.asarray(stats[name], dtype=np.float64) for name in PARAM_NAMES]
    return np.stack(cols, axis=-1)


def check_params(params: Tensor | np.ndarray) -> None:
    """Refuse parameter rows that are not (B, 4), not finite, or with lambda_max <= lambda_min.

    A tensor's values are read: on a GPU, a host sync. The training batches are checked here
    as arrays on the host before they move (``training.data.to_batch``), and the loss passes
    ``check=False``.
    """
    if params.ndim != 2 or params.shape[1] != len(PARAM_NAMES):
        raise ValueError(f"params must be (B, {len(PARAM_NAMES)}) {PARAM_NAMES}, "
                         f"got shape {tuple(params.shape)}")
    lib = np if isinstance(params, np.ndarray) else torch
    if not bool(lib.isfinite(params).all()):
        raise ValueError("params contain NaN or infinite values")
    if bool((params[:, 3] <= params[:, 2]).any()):
        raise ValueError("params: lambda_max (column 3) must be > lambda_min (column 2)")


def _exp_family(t: Tensor, lam_max: Tensor, span: Tensor, k: Tensor) -> Tensor:
    """lambda(t) = lambda_max + log((1 - t) + t e^(-k D)) / k, linear where |k| is tiny."""
    small = k.abs() < _K_LINEAR
    k_safe = torch.where(small, torch.ones_like(k), k)
    curved = lam_max + torch.logaddexp(torch.log1p(-t), torch.log(t) - k_safe * span) / k_safe
    return torch.where(small, lam_max - t * span, curved)


def spectral_lambda(t: Tensor, params: Tensor, kind: str = "mixed",
                    check: bool = True) -> Tensor:
    """Per-image log-SNR ``lambda(t)``: t (B,) in [0, 1], params (B, 4) -> (B,).

    Strictly decreasing in t, ``lambda(0) = lambda_max``, ``lambda(1) = lambda_min`` of each
    image. ``kind`` in {"frequency", "power", "mixed"}. Computed in float64, returned in the
    dtype of ``params`` (float32 at least). ``check=False`` skips reading the values of
    ``params`` and ``t`` (for a caller that checked them on the host: no device sync).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown spectral schedule kind {kind!r}: expected one of {KINDS}")
    if check:
        check_params(params)
    out_dtype = torch.promote_types(params.dtype, torch.float32)
    p = params.to(torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64, device=p.device).expand(p.shape[0])
    if check and bool(((t < 0) | (t > 1)).any()):
        raise ValueError("spectral_lambda: t must lie in [0, 1]")
    beta, lam_min, lam_max = p[:, 1].clamp_min(BETA_MIN), p[:, 2], p[:, 3]
    span = lam_max - lam_min  # D > 0
    lam_f = _exp_family(t, lam_max, span, 1.0 / beta)
    lam_p = _exp_family(t, lam_max, span, (2.0 - beta) / beta)
    lam = {"frequency": lam_f, "power": lam_p, "mixed": 0.5 * (lam_f + lam_p)}[kind]
    # pin the end points exactly (the log-sum-exp form is exact there up to rounding)
    lam = torch.where(t == 0, lam_max, torch.where(t == 1, lam_min, lam))
    return lam.to(out_dtype)


def spectral_lambda_grid(params: Tensor, steps: int, kind: str = "mixed") -> Tensor:
    """Sampling grid (steps + 1, B) of log-SNR values, noisiest first (t = 1 ... 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return torch.stack([spectral_lambda(t, params, kind) for t in ts])


def lambda_bounds(params: Tensor, check: bool = True) -> Tensor:
    """``(lambda(0), lambda(1)) = (lambda_max, lambda_min)``, (B, 2): ``Cond.lambda_bounds``.
    ``check=False``: as in :func:`spectral_lambda`."""
    if check:
        check_params(params)
    return torch.stack([params[:, 3], params[:, 2]], dim=1)


# --------------------------------------------------------------------------- mixture model


@dataclass
class GaussianMixture:
    """weights (K,), means (K, P), covariances (K, P, P), in parameter units."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(),
                "covariances": self.covariances.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GaussianMixture:
        g = cls(np.asarray(d["weights"], float), np.asarray(d["means"], float),
                np.asarray(d["covariances"], float))
        k, p = g.means.shape
        if g.weights.shape != (k,) or g.covariances.shape != (k, p, p):
            raise ValueError("schedule model: inconsistent mixture shapes in JSON")
        if not np.isclose(g.weights.sum(), 1.0, atol=1e-6) or (g.weights < 0).any():
            raise ValueError("schedule model: mixture weights must be >= 0 and sum to 1")
        return g

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """log density (N,) of points x (N, P)."""
        return _logsumexp(_component_logpdf(x, self), axis=1)


def _component_logpdf(x: np.ndarray, g: GaussianMixture) -> np.ndarray:
    """log(w_k N(x | mu_k, C_k)), (N, K)."""
    n, p = x.shape
    out = np.empty((n, len(g.weights)))
    for k in range(len(g.weights)):
        chol = np.linalg.cholesky(g.covariances[k])
        z = np.linalg.solve(chol, (x - g.means[k]).T)  # (P, N)
        logdet = 2.0 * np.log(np.diag(chol)).sum()
        out[:, k] = math.log(max(g.weights[k], 1e-300)) - 0.5 * (
            (z**2).sum(0) + logdet + p * math.log(2 * math.pi))
    return out


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def fit_gmm(x: np.ndarray, n_components: int, seed: int = 0, iters: int = 200,
            tol: float = 1e-7, reg: float = 1e-6) -> GaussianMixture:
    """Full-covariance Gaussian mixture by EM on standardised data (k-means++ start)."""
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"fit_gmm needs finite (N >= 2, P) data, got shape {x.shape}")
    k = max(1, min(n_components, len(x) // (x.shape[1] + 1)))
    mu0, sd0 = x.mean(0), x.std(0) + 1e-12
    z = (x - mu0) / sd0  # standardised (N, P)
    rng = np.random.default_rng(seed)
    centres = [z[rng.integers(len(z))]]
    for _ in range(1, k):  # k-means++ seeding
        d2 = np.min([((z - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(z[rng.choice(len(z), p=d2 / d2.sum()) if d2.sum() > 0 else 0])
    resp = np.eye(k)[np.argmin([((z - c) ** 2).sum(1) for c in centres], axis=0)]  # (N, K)
    prev = -np.inf
    g = None
    for _ in range(iters):
        nk = resp.sum(0) + 1e-10  # M step
        means = resp.T @ z / nk[:, None]
        covs = np.stack([((resp[:, j, None] * (z - means[j])).T @ (z - means[j])) / nk[j]
                         + reg * np.eye(z.shape[1]) for j in range(k)])
        g = GaussianMixture(nk / nk.sum(), means, covs)
        logp = _component_logpdf(z, g)  # E step
        ll = _logsumexp(logp, axis=1)
        resp = np.exp(logp - ll[:, None])
        if ll.mean() - prev < tol:
            break
        prev = ll.mean()
    assert g is not None
    scale = np.outer(sd0, sd0)
    return GaussianMixture(g.weights, g.means * sd0 + mu0, g.covariances * scale)


@dataclass
class ScheduleModel:
    """Distribution of per-image schedule parameters: one global mixture, optional per class.

    ``support``: per-column (lo, hi) of the training parameters; samples are clipped to it,
    beta to >= BETA_MIN and lambda_min to <= lambda_max - min_span, so every sample is a
    valid schedule. ``meta`` records what the parameters were computed with.
    """

    global_mixture: GaussianMixture
    support_lo: np.ndarray
    support_hi: np.ndarray
    per_class: dict[int, GaussianMixture] = field(default_factory=dict)
    min_span: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, params: np.ndarray, labels: np.ndarray | None = None, n_components: int = 4,
            per_class: bool = False, seed: int = 0, min_span: float = 1.0,
            meta: dict[str, Any] | None = None) -> ScheduleModel:
        """Fit on params (N, 4); per class where ``per_class`` and labels (N,) are given."""
        params = np.asarray(params, dtype=np.float64)
        if params.ndim != 2 or params.shape[1] != len(PARAM_NAMES):
            raise ValueError(f"params must be (N, {len(PARAM_NAMES)}), got {params.shape}")
        classes: dict[int, GaussianMixture] = {}
        if per_class:
            if labels is None or len(labels) != len(params):
                raise ValueError("per_class=True needs one label per parameter vector")
            for c in np.unique(labels):
                sel = params[labels == c]
                if int(c) >= 0 and len(sel) >= 2 * (params.shape[1] + 1):
                    classes[int(c)] = fit_gmm(sel, n_components, seed)
        return cls(fit_gmm(params, n_components, seed), params.min(0), params.max(0),
                   classes, min_span, dict(meta or {}))

    def to_json(self) -> dict[str, Any]:
        return {"format": "prism.spectral_schedule_model", "version": 1,
                "param_names": list(PARAM_NAMES), "global": self.global_mixture.to_json(),
                "per_class": {str(c): g.to_json() for c, g in sorted(self.per_class.items())},
                "support": {"lo": self.support_lo.tolist(), "hi": self.support_hi.tolist()},
                "min_span": self.min_span, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScheduleModel:
        """Load from the dict of ``schedule.json``; a clear error names what is wrong."""
        if d.get("format") != "prism.spectral_schedule_model":
            raise ValueError("not a prism spectral schedule model (missing 'format')")
        if tuple(d.get("param_names", ())) != PARAM_NAMES:
            raise ValueError(f"schedule model param_names {d.get('param_names')} != {PARAM_NAMES}")
        return cls(GaussianMixture.from_json(d["global"]),
                   np.asarray(d["support"]["lo"], float), np.asarray(d["support"]["hi"], float),
                   {int(c): GaussianMixture.from_json(g) for c, g in d["per_class"].items()},
                   float(d.get("min_span", 1.0)), dict(d.get("meta", {})))

    def _draw(self, g: GaussianMixture, n: int, gen: torch.Generator) -> Tensor:
        comp = torch.multinomial(torch.as_tensor(g.weights), n, replacement=True, generator=gen)
        z = torch.randn(n, g.means.shape[1], generator=gen, dtype=torch.float64)
        chol = torch.linalg.cholesky(torch.as_tensor(g.covariances))  # (K, P, P)
        return torch.as_tensor(g.means)[comp] + (chol[comp] @ z[:, :, None])[:, :, 0]

    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None,
               class_labels: Tensor | None = None) -> Tensor:
        """Draw n valid parameter vectors, (n, 4) float32.

        Randomness from ``generator``, else a generator seeded with ``seed`` (default 0).
        ``class_labels`` (n,): rows whose class has its own mixture use it; the rest (and
        label -1, the null class) use the global mixture.
        """
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        gen = generator or torch.Generator().manual_seed(0 if seed is None else seed)
        out = self._draw(self.global_mixture, n, gen)
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).cpu()
            if labels.numel() != n:
                raise ValueError(f"class_labels has {labels.numel()} entries, expected {n}")
            for c, g in sorted(self.per_class.items()):
                rows = (labels == c).nonzero().flatten()
                if rows.numel():
                    out[rows] = self._draw(g, rows.numel(), gen)
        lo, hi = torch.as_tensor(self.support_lo), torch.as_tensor(self.support_hi)
        out = torch.maximum(torch.minimum(out, hi), lo)
        out[:, 1] = out[:, 1].clamp(min=BETA_MIN)
        out[:, 2] = torch.minimum(out[:, 2], out[:, 3] - self.min_span)
        return out.float()
