"""Score SDEs (difflab.methods.sde): closed-form marginals, their consistency with the drift and
diffusion, Monte-Carlo of the forward SDE, the reverse SDE and the probability-flow ODE, and the
score a difflab denoiser implies."""

import math

import pytest
import torch

from difflab.denoiser import MixtureDenoiser
from difflab.methods.likelihood import solve_rk4
from difflab.methods.sde import VESDE, VPSDE, ScheduleSDE, SubVPSDE, score_from_denoiser
from difflab.mixture import GaussianMixture
from difflab.schedules import Schedule

F64 = torch.float64


def sdes():
    return [VPSDE(), SubVPSDE(), VESDE(), VESDE(exact_kernel=False), ScheduleSDE(Schedule.make("cosine", T=1000))]


def test_closed_form_marginals():
    """Against formulas evaluated independently: B(u) by quadrature of beta, VE by hand.
    Planted bug that turns this red: VP std = sqrt(1 - e^{-B/2})."""
    u = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=F64)
    grid = torch.linspace(0, 1, 200_001, dtype=F64)
    beta = 0.1 + grid * (20.0 - 0.1)
    B = torch.stack(
        [torch.trapezoid(beta[grid <= v], grid[grid <= v]) if v > 0 else torch.zeros((), dtype=F64) for v in u]
    )
    assert B[-1].item() == pytest.approx(0.1 + 0.5 * 19.9, abs=1e-8)  # 10.05
    vp, sub = VPSDE(), SubVPSDE()
    torch.testing.assert_close(vp.mean_coef(u), torch.exp(-B / 2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vp.std(u), (1 - torch.exp(-B)).sqrt(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sub.mean_coef(u), torch.exp(-B / 2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sub.std(u), 1 - torch.exp(-B), rtol=1e-9, atol=1e-12)
    assert (sub.std(u[1:]) < vp.std(u[1:])).all()  # "sub"-VP
    ve, ve_code = VESDE(0.01, 50.0), VESDE(0.01, 50.0, exact_kernel=False)
    sigma = torch.tensor([0.01, 0.01 * 5000**0.1, math.sqrt(0.01 * 50), 50.0], dtype=F64)
    torch.testing.assert_close(ve.sigma(u), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(ve.std(u), (sigma**2 - 1e-4).sqrt(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ve_code.std(u), sigma, rtol=1e-12, atol=0)
    assert (ve.mean_coef(u) == 1).all() and ve.prior_std == 50.0


def test_schedule_sde_is_the_schedules_continuous_view():
    """mean_coef^2 = alpha_bar at the grid (u = (t + 1) / T) and in between; std^2 = 1 - alpha_bar."""
    schedule = Schedule.make("linear", T=100)
    sde = ScheduleSDE(schedule)
    t = torch.tensor([0, 1, 37, 99])
    u = (t + 1).to(F64) / 100
    torch.testing.assert_close(sde.mean_coef(u) ** 2, schedule.alpha_bar[t], rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.std(u) ** 2, 1 - schedule.alpha_bar[t], rtol=1e-12, atol=0)
    v = torch.tensor([0.0, 0.0042, 0.5551], dtype=F64)
    torch.testing.assert_close(sde.mean_coef(v) ** 2, schedule.alpha_bar_at(v * 100 - 1), rtol=1e-12, atol=0)
    # the linear schedule with T = 1000 is close to, but not the same as, VPSDE(0.1, 20)
    big = ScheduleSDE(Schedule.make("linear", T=1000))
    w = torch.tensor([0.25, 0.5], dtype=F64)
    ratio = big.mean_coef(w) / VPSDE().mean_coef(w)
    assert ((ratio - 1).abs() < 0.02).all() and ((ratio - 1).abs() > 1e-4).all()


@pytest.mark.parametrize("sde", sdes(), ids=repr)
def test_drift_and_diffusion_generate_the_marginal(sde):
    """For dx = a(u) x du + g(u) dw the moments obey d mean_coef / du = a mean_coef and
    d std^2 / du = 2 a std^2 + g^2 (Ito). Central differences (h = 1e-6) against the closed
    forms, relative 1e-6 (the difference quotient's own error is ~h^2 f''' ~ 1e-10). Planted
    bug that turns this red: sub-VP diffusion without its discount 1 - e^{-2B}."""
    u = torch.tensor([0.0504, 0.2013, 0.4317, 0.7702, 0.9603], dtype=F64)  # off the grid u = k / 1000
    h = 1e-6
    a, g = sde.drift_coef(u), sde.diffusion(u)
    d_mean = (sde.mean_coef(u + h) - sde.mean_coef(u - h)) / (2 * h)
    d_var = (sde.std(u + h) ** 2 - sde.std(u - h) ** 2) / (2 * h)
    torch.testing.assert_close(d_mean, a * sde.mean_coef(u), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(d_var, 2 * a * sde.std(u) ** 2 + g**2, rtol=1e-6, atol=1e-12)


def euler_maruyama(sde, x0, steps, generator, record):
    """Forward SDE from u = 0 to 1; the paths at the step indices in `record`."""
    du = 1.0 / steps
    x, out = x0.clone(), {}
    for n in range(steps):
        u = torch.tensor(n * du, dtype=F64)
        z = torch.randn(x.shape, generator=generator, dtype=F64)
        x = x + sde.drift(x, u) * du + sde.diffusion(u) * math.sqrt(du) * z
        if n + 1 in record:
            out[n + 1] = x
    return out


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=repr)
def test_euler_maruyama_matches_the_closed_form_marginal(sde):
    """20,000 paths from x0 = 1.5, 1,000 Euler-Maruyama steps. Tolerance: 5 Monte-Carlo standard
    errors (std / sqrt(N) for the mean, std / sqrt(2N) for the std) plus 1% of the value for
    Euler's O(du) bias (du * beta_max = 0.02). VE at u = 0.1 tells the exact kernel sigma^2 -
    sigma_min^2 (std 0.0212) from sigma^2 (0.0234): the paper code's kernel fails here."""
    N, steps = 20_000, 1000
    x0 = torch.full((N, 1), 1.5, dtype=F64)
    paths = euler_maruyama(sde, x0, steps, torch.Generator().manual_seed(0), {100, 500, 1000})
    for n, x in paths.items():
        u = torch.tensor(n / steps, dtype=F64)
        mean, std = sde.mean_coef(u).item() * 1.5, sde.std(u).item()
        se_mean, se_std = std / math.sqrt(N), std / math.sqrt(2 * N)
        assert abs(x.mean().item() - mean) < 5 * se_mean + 0.01 * abs(mean), (n, x.mean().item(), mean)
        assert abs(x.std().item() - std) < 5 * se_std + 0.01 * std, (n, x.std().item(), std)
        if isinstance(sde, VESDE) and n == 100:
            wrong = sde.sigma(u).item()  # negative control: the other kernel is far off
            assert abs(x.std().item() - wrong) > 5 * se_std + 0.01 * wrong


def gaussian_score(sde, mu, s):
    """Exact score of the marginal of N(mu, s^2) data: N(m mu, m^2 s^2 + std^2)."""

    def score(x, u):
        u = torch.as_tensor(u, dtype=F64).expand(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))
        m, st = sde.mean_coef(u), sde.std(u)
        return -(x - m * mu) / (m**2 * s**2 + st**2)

    return score


def test_reverse_sde_recovers_the_data_marginal():
    """Reverse-time SDE (Eq. 6) by Euler-Maruyama from the prior N(0, 1) at u = 1 to u = 1e-3
    with the exact score of N(0.5, 0.4^2) data under the VP SDE: the end matches the marginal
    there. Tolerance 5 SE + 2% (Euler's bias is larger here: the score term g^2 / v reaches 20).
    Planted bug that turns this red: the reverse drift f - 1/2 g^2 score (the ODE's) with the
    SDE's noise."""
    sde, mu, s = VPSDE(), 0.5, 0.4
    score = gaussian_score(sde, mu, s)
    N, steps, u_end = 20_000, 1000, 1e-3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, generator=gen, dtype=F64)
    du = (1.0 - u_end) / steps
    for n in range(steps):
        u = torch.tensor(1.0 - n * du, dtype=F64)
        z = torch.randn(x.shape, generator=gen, dtype=F64)
        x = x - sde.reverse_drift(x, u, score(x, u)) * du + sde.diffusion(u) * math.sqrt(du) * z
    u = torch.tensor(u_end, dtype=F64)
    m, st = sde.mean_coef(u).item(), sde.std(u).item()
    mean, std = m * mu, math.sqrt(m * m * s * s + st * st)
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(N) + 0.02 * mean
    assert abs(x.std().item() - std) < 5 * std / math.sqrt(2 * N) + 0.02 * std


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=repr)
def test_probability_flow_ode_is_the_gaussian_transport_map(sde):
    """For Gaussian data the probability-flow ODE (Eq. 13) maps x_1 to m_0 mu + sqrt(v_0 / v_1)
    (x_1 - m_1 mu) (it moves each point along the marginals' affine transport). RK4, 200 steps,
    from u = 1 to 1e-3: within 1e-6 relative. Planted bug that turns this red: dropping the 1/2."""
    mu, s = torch.tensor([[0.5, -1.0]], dtype=F64), 0.4
    score = gaussian_score(sde, mu, s)
    x1 = torch.tensor([[0.3, -2.0], [4.0, 1.0]], dtype=F64) * sde.prior_std

    def rhs(u, x):
        return sde.ode_drift(x, u, score(x, u))

    x0, _ = solve_rk4(rhs, x1, 1.0, 1e-3, steps=200)
    m0, m1 = (sde.mean_coef(torch.tensor(v, dtype=F64)).item() for v in (1e-3, 1.0))
    v0, v1 = (
        (sde.mean_coef(torch.tensor(v, dtype=F64)) ** 2 * s**2 + sde.std(torch.tensor(v, dtype=F64)) ** 2).item()
        for v in (1e-3, 1.0)
    )
    expected = m0 * mu + math.sqrt(v0 / v1) * (x1 - m1 * mu)
    torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sde", [None, VPSDE(), SubVPSDE(), VESDE()], ids=repr)
def test_score_from_denoiser_is_the_exact_score(sde):
    """The exact denoiser of N(mu, S) (a correlated Gaussian) read as a score, directly for its
    own schedule (sde None) or through sigma_to_t for another SDE, equals the analytic score
    -C^-1 (x - m mu), C = m^2 S + std^2 I, to 1e-8 relative. Planted bug that turns this red:
    not dividing x by sqrt(m^2 + std^2) (the VE case)."""
    schedule = Schedule.make("cosine", T=1000)
    mu = torch.tensor([[0.5, -0.3, 0.2]], dtype=F64)
    S = torch.tensor([[0.2, 0.05, 0.0], [0.05, 0.1, -0.02], [0.0, -0.02, 0.3]], dtype=F64)
    denoiser = MixtureDenoiser(GaussianMixture(torch.ones(1), mu, S[None]), schedule)
    score = score_from_denoiser(denoiser, sde)
    the_sde = sde or ScheduleSDE(schedule)
    gen = torch.Generator().manual_seed(0)
    for u in (1e-3, 0.0423, 0.5, 0.97):
        x = torch.randn(4, 3, generator=gen, dtype=F64) * the_sde.std(torch.tensor(u, dtype=F64))
        uu = torch.tensor(u, dtype=F64)
        m, st = the_sde.mean_coef(uu), the_sde.std(uu)
        C = m**2 * S + st**2 * torch.eye(3, dtype=F64)
        expected = -torch.linalg.solve(C, (x - m * mu).T).T
        torch.testing.assert_close(score(x, u), expected, rtol=1e-8, atol=1e-10)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="u must lie in"):
        VPSDE().drift(torch.zeros(2, 1), 1.5)
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="Schedule"):
        ScheduleSDE("cosine")
    with pytest.raises(ValueError, match="shape"):
        VPSDE().drift(torch.zeros(2, 1), torch.zeros(3))
