"""Generalised linear degradation and the SSD process against brute-force dense Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from components import degradation as dg
from components.scale import resize
from components.ssd import SSDProcess

torch.set_default_dtype(torch.float32)
F64 = torch.float64


def dense(apply, n_in: int, side_in: int) -> torch.Tensor:
    """Dense matrix of an image-wise linear map on (1, side, side) images (n_in = side^2)."""
    basis = torch.eye(n_in, dtype=F64).reshape(n_in, 1, side_in, side_in)
    return apply(basis).reshape(n_in, -1).T  # (n_out, n_in)


def chain_joint(process: SSDProcess, x0: torch.Tensor, k_last: int):
    """Brute force: run the Markov chain x_k = M_k x_{k-1} + w_k, w_k ~ N(0, Q_k) with
    Q_k = sigma_k^2 I - sigma_{k-1}^2 M_k M_k^T, as dense means and covariances.

    Returns per state k: (mean, cov, cross) with cross = Cov(x_k, x_{k-1})."""
    side = x0.shape[-1]
    mean, cov = x0.reshape(-1), torch.zeros(side * side, side * side, dtype=F64)
    out = []
    for k in range(k_last + 1):
        s_in = process.res(k - 1)
        M = dense(process.transition(k - 1, k).apply, s_in * s_in, s_in)
        Q = process.sigma(k) ** 2 * torch.eye(M.shape[0], dtype=F64) \
            - process.sigma(k - 1) ** 2 * M @ M.T
        assert torch.linalg.eigvalsh(Q).min() > -1e-12, f"step noise of k={k} is not PSD"
        cross = M @ cov
        mean, cov = M @ mean, M @ cov @ M.T + Q
        out.append((mean, cov, cross))
    return out


def condition(mu_a, C_aa, mu_b, C_bb, C_ba, x_b):
    """Dense Gaussian conditioning of a on b = x_b (Schur complement, linalg.solve)."""
    K = torch.linalg.solve(C_bb, C_ba).T  # C_ab C_bb^{-1}
    return mu_a + K @ (x_b - mu_b), C_aa - K @ C_ba


@pytest.fixture(scope="module")
def small_process() -> SSDProcess:
    # 8 px, 2 levels, 6 steps: r = 8, 8, 8, 8, 4, 4 (the 8 -> 4 step is k = 4)
    p = SSDProcess(8, levels=2, T=6, beta_start=0.05, beta_end=0.4)
    assert p.resolutions == [8, 8, 8, 8, 4, 4]
    return p


def test_marginal_of_the_chain_is_isotropic(small_process):
    p = small_process
    x0 = torch.rand(1, 1, 8, 8, dtype=F64) * 2 - 1
    for k, (mean, cov, _) in enumerate(chain_joint(p, x0, p.T - 1)):
        r = p.res(k)
        torch.testing.assert_close(mean, (p.a(k) * p.down(x0, r)).reshape(-1), atol=1e-10, rtol=0)
        torch.testing.assert_close(cov, p.sigma(k) ** 2 * torch.eye(r * r, dtype=F64),
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 4, 5])  # 4: the resolution-increasing step (4 px -> 8 px)
def test_posterior_equals_brute_force_conditioning(small_process, k):
    p = small_process
    g = torch.Generator().manual_seed(k)
    x0 = torch.rand(1, 1, 8, 8, dtype=F64, generator=g) * 2 - 1
    joint = chain_joint(p, x0, k)
    (mu_j, C_jj, _), (mu_k, C_kk, C_kj) = joint[k - 1], joint[k]
    rk, rj = p.res(k), p.res(k - 1)
    x_k = torch.randn(1, 1, rk, rk, dtype=F64, generator=g)
    mean_bf, cov_bf = condition(mu_j, C_jj, mu_k, C_kk, C_kj, x_k.reshape(-1))
    # the process's posterior (x0_hat = the true x0 at r(j))
    mean = p.posterior_step(x_k, p.down(x0, rj), k - 1, k, None)
    torch.testing.assert_close(mean.reshape(-1), mean_bf, atol=1e-5, rtol=0)
    # its noise map L (z -> noise) is linear: Sigma = L L^T
    L = dense(lambda z: p.posterior_noise(z, k - 1, k), rj * rj, rj)
    torch.testing.assert_close(L @ L.T, cov_bf, atol=1e-5, rtol=0)
    # the generic formulas of components.degradation give the same covariance
    op = p.transition(k - 1, k)
    S = dense(lambda v: dg.posterior_cov_apply(v, op, p.sigma(k - 1), p.sigma(k)), rj * rj, rj)
    torch.testing.assert_close(S, cov_bf, atol=1e-5, rtol=0)
    assert dg.check_psd(op, (1, rj, rj), p.sigma(k - 1), p.sigma(k), step=k) >= 0


def test_identity_like_operator_posterior_is_ddpm():
    ab = SSDProcess(8, levels=1, T=50).alpha_bar
    ops = dg.ddpm_ops(ab)
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 3, 4, 4, dtype=F64, generator=g), torch.randn(2, 3, 4, 4, dtype=F64)
    for t in (2, 10, 50):
        s_prev, s_t = math.sqrt(1 - ab[t - 2]), math.sqrt(1 - ab[t - 1])
        mu_prev = dg.compose(ops[: t - 1]).apply(x0)
        mean = dg.posterior_mean(x_t, mu_prev, ops[t - 1], s_prev, s_t)
        cov_v = dg.posterior_cov_apply(x0, ops[t - 1], s_prev, s_t)
        mean_ref, var_ref = dg.ddpm_posterior(x_t, x0, ab, t)
        torch.testing.assert_close(mean, mean_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(cov_v, var_ref * x0, atol=1e-10, rtol=0)


def test_identity_like_dense_conditioning():
    # a random scaled-identity chain, dense brute force vs the formulas
    cs, sig = [0.9, 0.8], [0.3, 0.6]
    n = 5
    I = torch.eye(n, dtype=F64)
    C_jj = sig[0] ** 2 * I
    M = cs[1] * I
    C_kk = M @ C_jj @ M.T + (sig[1] ** 2 - cs[1] ** 2 * sig[0] ** 2) * I
    mu_j, x_k = torch.randn(n, dtype=F64), torch.randn(n, dtype=F64)
    mean_bf, cov_bf = condition(mu_j, C_jj, M @ mu_j, C_kk, M @ C_jj, x_k)
    op = dg.scaled_identity(cs[1])
    torch.testing.assert_close(dg.posterior_mean(x_k, mu_j, op, *sig), mean_bf, atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(dense(lambda v: dg.posterior_cov_apply(v, op, *sig), 4, 2),
                               cov_bf[:4, :4], atol=1e-12, rtol=0)


def test_separable_resize_matches_scale_resize():
    p = SSDProcess(32, levels=3)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    torch.testing.assert_close(p.down(x, 16), resize(x, 16), atol=1e-10, rtol=0)
    torch.testing.assert_close(p.down(x, 8), resize(resize(x, 16), 8), atol=1e-10, rtol=0)
    op, y = p.resize_op(32, 8), torch.randn(2, 3, 8, 8, dtype=F64)
    assert abs(float((op.apply(x) * y).sum() - (x * op.transpose(y)).sum())) < 1e-9


def test_psd_check_names_the_failing_step():
    with pytest.raises(ValueError, match="step 7: .*PSD"):
        dg.check_psd(dg.scaled_identity(2.0), (1, 2, 2), 0.5, 0.5, step=7)


def test_lanczos_sqrt_matches_exact_eigenbasis_noise(small_process):
    p = small_process
    z = torch.randn(3, 1, 8, 8, dtype=F64)
    exact = p.posterior_noise(z, 3, 4)
    lz = dg.posterior_noise_lanczos(z, p.transition(3, 4), p.sigma(3), p.sigma(4), iters=64)
    torch.testing.assert_close(lz, exact, atol=1e-7, rtol=0)


def test_resolution_increasing_noise_empirical_covariance():
    p = SSDProcess(4, levels=2, T=6, beta_start=0.05, beta_end=0.4)
    k = p.resolutions.index(2)  # first 2 px state: the 2 -> 4 px reverse step
    n = 200_000
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 1, 4, 4, dtype=F64, generator=g)
    noise = p.posterior_noise(z, k - 1, k).reshape(n, 16)
    emp = noise.T @ noise / n
    op = p.transition(k - 1, k)
    target = dense(lambda v: dg.posterior_cov_apply(v, op, p.sigma(k - 1), p.sigma(k)), 16, 4)
    # it is not isotropic (the point of the exact draw) ...
    assert (target - torch.diag(torch.diag(target))).abs().max() > 0.01 * target.diag().mean()
    # ... and the draws match it: entries within 6 standard errors (sigma^2 sqrt(2/n))
    se = float(target.diag().max()) * math.sqrt(2 / n)
    assert (emp - target).abs().max() < 6 * se
