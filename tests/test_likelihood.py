"""Exact likelihood through the probability-flow ODE (difflab.methods.likelihood): the divergence
estimators, the solvers, log-likelihoods of Gaussian and mixture data against their exact
densities, and the 8-bit dequantisation offset."""

import math

import pytest
import torch
from torch import nn

from difflab.denoiser import Denoiser, MixtureDenoiser
from difflab.methods.likelihood import (
    dequantize,
    dequantized_bits_per_dim,
    divergence_exact,
    divergence_hutchinson,
    ode_bits_per_dim,
    ode_log_likelihood,
    rademacher,
    solve_rk4,
    solve_rk45,
    to_levels,
)
from difflab.methods.sde import VESDE, VPSDE, ScheduleSDE, score_from_denoiser
from difflab.mixture import GaussianMixture
from difflab.process import Prediction
from difflab.schedules import Schedule

F64 = torch.float64
LN2 = math.log(2.0)


def bits(nats, D):
    return nats / (D * LN2)


# ---------------------------------------------------------------- divergence
def test_hutchinson_mean_is_the_trace_of_a_matrix():
    """2,000 Rademacher probes of a fixed 8x8 matrix: v^T A v = tr A + sum_{i<j} (A_ij + A_ji) v_i v_j
    has variance sum_{i<j} (A_ij + A_ji)^2. The mean is within 4 standard errors of tr A, and the
    sample variance within 15% of that value (a Gaussian probe would add 2 sum A_ii^2: planted, this
    goes red, as does dropping the final multiplication by the probe)."""
    A = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    R = 2000
    x = torch.randn(R, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    probe = rademacher((R, 8), torch.Generator().manual_seed(2))
    f, est = divergence_hutchinson(lambda z: z @ A.T, x, probe)
    torch.testing.assert_close(f, x @ A.T)
    pair = A + A.T
    var = (pair.triu(1) ** 2).sum().item()
    assert abs(est.mean().item() - A.trace().item()) < 4 * math.sqrt(var / R)
    assert est.var().item() == pytest.approx(var, rel=0.15)
    assert set(probe.unique().tolist()) == {-1.0, 1.0}


def test_hutchinson_and_exact_divergence_of_an_mlp():
    """A small tanh MLP at one point: the exact divergence equals the trace of autograd's Jacobian
    (1e-12), and the mean of 2,000 Hutchinson estimates is within 4 standard errors of it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    trace = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x[0]).trace()
    _, exact = divergence_exact(net, x)
    torch.testing.assert_close(exact, trace[None], rtol=1e-12, atol=1e-12)
    R = 2000
    probe = rademacher((R, 5), torch.Generator().manual_seed(4))
    _, est = divergence_hutchinson(net, x.expand(R, 5), probe)
    assert abs(est.mean() - trace).item() < 4 * est.std().item() / math.sqrt(R)
    assert est.std().item() > 0.05  # the probes do vary: the test is not vacuous


# ---------------------------------------------------------------- solvers
def test_solvers_on_a_known_ode():
    """y' = cos(5u) y, y(0) = 1 has y(1) = exp(sin(5) / 5). RK4 with 100 steps: error < 1e-8
    (h^4 ~ 1e-8 times a small constant); RK45 error below 10 * tol for tol 1e-5 and 1e-8, with fewer
    evaluations at the looser tolerance, forwards and backwards. Planted bug that turns this red:
    one Dormand-Prince weight wrong (b5[2] = 500/1112)."""

    def f(u, y):
        return math.cos(5 * u) * y

    y0 = torch.ones(2, 3, dtype=F64)
    exact = math.exp(math.sin(5) / 5)
    y, nfe = solve_rk4(f, y0, 0.0, 1.0, steps=100)
    assert nfe == 400 and (y - exact).abs().max().item() < 1e-8
    nfes = []
    for tol in (1e-5, 1e-8):
        y, nfe = solve_rk45(f, y0, 0.0, 1.0, rtol=tol, atol=tol)
        assert (y - exact).abs().max().item() < 10 * tol
        back, _ = solve_rk45(f, y, 1.0, 0.0, rtol=tol, atol=tol)
        assert (back - 1).abs().max().item() < 10 * tol
        nfes.append(nfe)
    assert nfes[0] < nfes[1]
    with pytest.raises(RuntimeError, match="max_steps"):
        solve_rk45(f, y0, 0.0, 1.0, rtol=1e-10, atol=1e-10, max_steps=3)


# ---------------------------------------------------------------- log-likelihoods
def test_gaussian_log_likelihood_from_the_schedules_first_level():
    """N(mu, 0.4^2 I) in 4-D with its exact denoiser on a cosine schedule (T = 1000), float64,
    RK45 at the default rtol = atol = 1e-5 from the first level u = 1/T to u = 1, exact divergence
    and Hutchinson: log p within 0.01 bit/dim of the exact data log-density.

    Error budget: the ODE gives log p_{1/T}, the data blurred by sqrt(1 - alpha_bar_0) = 0.0064
    (1.2e-4 bit/dim here); the prior N(0, I) is off by alpha_bar(1) = 2.4e-9 (nothing); and the
    schedule's continuous view interpolates alpha_bar linearly in t, so beta(u) is a staircase
    whose steps RK45's error estimate cannot see (~6e-4 bit/dim here, shrinking with steps <= 1/T).
    So also: within 2e-3 bit/dim of the exact log p_{1/T}. Planted bug that turns this red:
    bits offset or sign of the accumulated divergence flipped (log p = prior - delta)."""
    schedule = Schedule.make("cosine", T=1000)
    mu = torch.tensor([[0.5, -0.3, 0.2, 1.0]], dtype=F64)
    data = GaussianMixture.isotropic(torch.ones(1), mu, std=0.4)
    sde = ScheduleSDE(schedule)
    score = score_from_denoiser(MixtureDenoiser(data, schedule), sde)
    x = data.sample(3, generator=torch.Generator().manual_seed(1))
    exact_data = data.log_prob(x)
    exact_first = data.noised(schedule.alpha_bar[0].item()).log_prob(x)
    assert bits((exact_first - exact_data).abs().max(), 4) < 2e-4
    # exact divergence, and Hutchinson with 4 probes per point (isotropic: each probe is exact)
    out = ode_log_likelihood(score, sde, x, u_start=1 / schedule.T, divergence="exact")
    rows = x.repeat_interleave(4, 0)
    hutch = ode_log_likelihood(score, sde, rows, u_start=1 / schedule.T, generator=torch.Generator().manual_seed(0))
    hutch_mean = hutch["logp"].reshape(3, 4).mean(1)
    for logp in (out["logp"], hutch_mean):
        assert bits((logp - exact_data).abs().max(), 4) < 0.01
        assert bits((logp - exact_first).abs().max(), 4) < 2e-3
    assert out["nfe"] > 0 and out["x_end"].shape == x.shape


def test_mixture_log_likelihood_is_exact_with_a_smooth_sde():
    """A two-component mixture in 2-D (a non-linear score) under the VP SDE (smooth beta), read
    through `score_from_denoiser` from a cosine schedule's exact denoiser, exact divergence, RK45 at
    rtol = atol = 1e-7, with the exact p_1 as prior: log p_{u0} exact to 1e-5 bit/dim (seen: ~5e-7;
    RK45's error scales with the tolerance). With the default N(0, I) prior, it matches the data
    density within 0.01 bit/dim (the prior's mismatch, alpha_bar(1) = e^-10.05, costs ~0.005)."""
    schedule = Schedule.make("cosine", T=1000)
    data = GaussianMixture.isotropic(torch.tensor([0.3, 0.7]), torch.tensor([[-0.6, 0.2], [0.5, -0.4]]), std=0.25)
    sde, u0 = VPSDE(), 1e-5
    score = score_from_denoiser(MixtureDenoiser(data, schedule), sde)

    def noised(u):  # VP: m^2 + std^2 = 1, so p_u is the mixture noised at alpha_bar = m^2
        return data.noised(sde.mean_coef(torch.tensor(u, dtype=F64)).item() ** 2)

    x = data.sample(4, generator=torch.Generator().manual_seed(2))
    tight = ode_log_likelihood(
        score, sde, x, u_start=u0, divergence="exact", rtol=1e-7, atol=1e-7, prior_logp=noised(1.0).log_prob
    )
    assert bits((tight["logp"] - noised(u0).log_prob(x)).abs().max(), 2) < 1e-5
    default = ode_log_likelihood(score, sde, x, u_start=u0, divergence="exact")
    assert bits((default["logp"] - data.log_prob(x)).abs().max(), 2) < 0.01


def test_hutchinson_log_likelihood_on_a_correlated_gaussian():
    """A correlated Gaussian in 4-D (so one probe's estimate does vary: by ~0.06 bit/dim here, as
    v^T (int J du) v with int J du = 1/2 (log C_1 - log C_{u0}) off-diagonal), linear schedule
    (T = 1000) from its first level, exact prior, 200 probes per point in one batched solve. Each
    point's mean is within 4 standard errors + 1e-3 bit/dim (the discrete schedule's staircase, see
    above) of the exact log p_{1/T}, and the standard error is below 0.01 bit/dim. Planted bug that
    turns this red: one probe shared by every row (all estimates equal, no spread)."""
    schedule = Schedule.make("linear", T=1000)
    mu = torch.tensor([[0.4, -0.2, 0.1, 0.3]], dtype=F64)
    cov = torch.diag(torch.tensor([0.16, 0.12, 0.2, 0.09], dtype=F64)) + 0.01 * (1 - torch.eye(4, dtype=F64))
    data = GaussianMixture(torch.ones(1), mu, cov[None])
    sde = ScheduleSDE(schedule)
    score = score_from_denoiser(MixtureDenoiser(data, schedule), sde)
    x = data.sample(3, generator=torch.Generator().manual_seed(5))
    P = 200
    out = ode_log_likelihood(
        score,
        sde,
        x.repeat_interleave(P, 0),
        u_start=1 / schedule.T,
        generator=torch.Generator().manual_seed(6),
        prior_logp=data.noised(schedule.alpha_bar[-1].item()).log_prob,
    )
    per_point = bits(out["logp"].reshape(3, P), 4)
    mean, se = per_point.mean(1), per_point.std(1) / math.sqrt(P)
    assert ((se > 1e-4) & (se < 0.01)).all(), se  # the probes matter here, and 200 are enough
    exact_first = bits(data.noised(schedule.alpha_bar[0].item()).log_prob(x), 4)
    assert ((mean - exact_first).abs() < 4 * se + 1e-3).all(), (mean - exact_first, se)


def test_a_wrong_score_gives_a_wrong_likelihood():
    """Negative control: the exact denoiser of N(mu, (1.3 s)^2) as the model of N(mu, s^2) data.
    The ODE then measures the *model's* density: far (> 0.1 bit/dim) from the true one, and
    within 0.01 bit/dim of the wrong Gaussian's."""
    schedule = Schedule.make("cosine", T=1000)
    mu = torch.tensor([[0.5, -0.3, 0.2, 1.0]], dtype=F64)
    data = GaussianMixture.isotropic(torch.ones(1), mu, std=0.4)
    model = GaussianMixture.isotropic(torch.ones(1), mu, std=0.52)
    sde = VPSDE()
    x = data.sample(3, generator=torch.Generator().manual_seed(1))
    out = ode_log_likelihood(score_from_denoiser(MixtureDenoiser(model, schedule), sde), sde, x, divergence="exact")
    assert (bits((out["logp"] - data.log_prob(x)).abs(), 4) > 0.1).all()
    assert (bits((out["logp"] - model.log_prob(x)).abs(), 4) < 0.01).all()


# ---------------------------------------------------------------- 8-bit data
def test_flat_density_gives_exactly_eight_bits():
    """By hand: a flat density on [-1, 1]^D has log p = -D log 2, so -log2 p / D + 7 = 8 bits/dim,
    the code length of 256 equally likely levels. Through the formula, and through the whole
    `ode_bits_per_dim` pipeline (uint8 -> dequantised -> ODE -> offset) with a zero score under
    the VE SDE (no drift: x stays put) and a flat prior. Planted bug that turns this red: an
    offset of D log 256 (bins of width 1/256) or D log 127.5."""
    for D in (1, 3, 256):
        assert dequantized_bits_per_dim(torch.tensor([-D * LN2], dtype=F64), D).item() == pytest.approx(8.0, abs=1e-12)

    class ZeroScore(Denoiser):
        schedule = Schedule.ve(0.01, 50.0, n=10)

        def predict(self, x_t, t, cond):
            ab = self.schedule.alpha_bar_at(t).reshape(-1, 1, 1, 1).to(x_t)
            return Prediction(x0=x_t / ab.sqrt(), eps=torch.zeros_like(x_t))

    def flat(x):
        inside = ((x >= -1) & (x < 1)).flatten(1).all(1)
        return torch.where(inside, torch.full(inside.shape, -x[0].numel() * LN2, dtype=F64), -math.inf)

    levels = torch.arange(256, dtype=torch.uint8).reshape(64, 1, 2, 2)
    out = ode_bits_per_dim(
        ZeroScore(), levels, sde=VESDE(), repeats=2, generator=torch.Generator().manual_seed(0), prior_logp=flat
    )
    torch.testing.assert_close(out["bpd"], torch.full((64,), 8.0, dtype=F64), rtol=0, atol=1e-9)
    assert out["mean"] == pytest.approx(8.0, abs=1e-9) and out["sem"] == pytest.approx(0.0, abs=1e-9)


def test_dequantised_bits_of_a_quantised_gaussian_match_its_entropy():
    """1-D N(0, 0.25^2) density, data = its 256 bin probabilities P(k) on [-1, 1] (renormalised;
    6e-5 of mass lies outside). The expected dequantised bits, sum_k P(k) E_w[bpd], computed in
    closed form (E of x^2 over a bin is (a^2 + ab + b^2) / 3), bound the entropy H(P) from above
    (Jensen) and, the density being smooth at the bin scale, by less than 1e-3 bits. A wrong
    offset of log 256 or log 127.5 instead of log 128 misses by 1 or 0.0056 bits."""
    s = 0.25
    edges = torch.arange(257, dtype=F64) / 128 - 1
    cdf = torch.special.ndtr(edges / s)
    P = cdf.diff() / (cdf[-1] - cdf[0])
    entropy = -(P * torch.log2(P)).sum().item()
    a, b = edges[:-1], edges[1:]
    mean_neg_logp = (a**2 + a * b + b**2) / 3 / (2 * s**2) + math.log(s * math.sqrt(2 * math.pi))
    expected = (P * dequantized_bits_per_dim(-mean_neg_logp, 1)).sum().item()
    assert 0 <= expected - entropy < 1e-3, (expected, entropy)


def test_dequantize_fills_each_level_bin_and_levels_round_trip():
    k = torch.arange(256).repeat(40)
    x = dequantize(k, torch.Generator().manual_seed(0))
    y = (x + 1) * 128
    assert (y.floor().long() == k).all() and x.min() >= -1 and x.max() < 1
    assert (y - k).mean().item() == pytest.approx(0.5, abs=0.01)  # uniform within its bin
    u8 = torch.arange(256, dtype=torch.uint8)
    assert (to_levels(u8) == u8.long()).all()
    assert (to_levels(u8.float() / 127.5 - 1) == u8.long()).all()  # difflab's float scaling
    with pytest.raises(ValueError, match="8-bit"):
        to_levels(torch.tensor([0.0, 0.1, 0.2]))  # off the grid (e.g. 17-level digits)
    with pytest.raises(ValueError, match="uint8"):
        to_levels(torch.arange(3))


def test_ode_bits_per_dim_of_8bit_gaussian_images():
    """End to end: 2x2 'images' quantised from N(0.2, 0.3^2) per pixel, the exact denoiser of that
    Gaussian on a cosine schedule, uint8 input, 2 repeats. Each example's bits/dim is compared with
    the exact discrete code length -log2 P(k) / D, P the model density at the first level integrated
    over the pixel bins (a product of normal CDF differences). Tolerances: 0.01 bit/dim on the mean
    over 16 examples, 0.05 per example: the dequantisation noise (log p varies ~0.05 nats per pixel
    across a bin) gives ~0.01 bit/dim per example and repeat; the Jensen gap and the schedule's
    staircase are < 1e-3. Float input on difflab's grid gives the same numbers."""
    schedule = Schedule.make("cosine", T=1000)
    mean, s = 0.2, 0.3
    data = GaussianMixture.isotropic(torch.ones(1), torch.full((1, 4), mean, dtype=F64), std=s)
    denoiser = MixtureDenoiser(data, schedule, sample_shape=(1, 2, 2))
    pixels = data.sample(16, generator=torch.Generator().manual_seed(0)).reshape(16, 1, 2, 2)
    levels = ((pixels + 1) * 128).floor().clamp(0, 255).to(torch.uint8)
    out = ode_bits_per_dim(denoiser, levels, repeats=2, generator=torch.Generator().manual_seed(1))
    a0 = schedule.alpha_bar[0].item()
    m, sd = math.sqrt(a0) * mean, math.sqrt(a0 * s * s + 1 - a0)
    lo = levels.double() / 128 - 1
    mass = torch.special.ndtr((lo + 1 / 128 - m) / sd) - torch.special.ndtr((lo - m) / sd)
    exact = -torch.log2(mass).flatten(1).mean(1)
    assert abs(out["mean"] - exact.mean().item()) < 0.01
    assert (out["bpd"] - exact).abs().max().item() < 0.05
    assert out["per_repeat"].shape == (2, 16) and 0 < out["sem"] < 0.01 and out["nfe"] > 0
    again = ode_bits_per_dim(
        denoiser, levels.float() / 127.5 - 1, repeats=2, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(again["bpd"], out["bpd"])


def test_bad_arguments_are_refused():
    schedule = Schedule.make("cosine", T=10)
    data = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), std=0.5)
    score = score_from_denoiser(MixtureDenoiser(data, schedule))
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(score, VPSDE(), x, divergence="trace")
    with pytest.raises(ValueError, match="solver"):
        ode_log_likelihood(score, VPSDE(), x, solver="euler")
    with pytest.raises(ValueError, match="u_start"):
        ode_log_likelihood(score, VPSDE(), x, u_start=0.5, u_end=0.2)
    with pytest.raises(ValueError, match="rtol"):
        solve_rk45(lambda u, y: y, x, 0.0, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match="repeats"):
        ode_bits_per_dim(MixtureDenoiser(data, schedule), torch.zeros(1, 2, dtype=torch.uint8), repeats=0)
