"""Samplers against the exact mixture denoiser: right distribution, exact equivalences,
determinism, inversion, interpolation, seeding and the `sample` entry point."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import MixtureDenoiser
from difflab.mixture import GaussianMixture
from difflab.samplers import (
    DEFAULT_SPACING,
    SAMPLERS,
    ddim,
    ddim_invert,
    ddpm,
    default_spacing,
    get_timesteps,
    sample,
    sampling_plan,
    slerp,
)
from difflab.schedules import Schedule
from test_samplers_support import (
    MIXTURE,
    SCHEDULES,
    assert_matches_mixture,
    distribution_z_scores,
    mixture_denoiser,
)

N = 8000  # distribution tests: SE of a covariance entry ~3.5% for the 0.2-weight component

# (sampler, T, steps, options): enough steps for discretisation error well below the sampling
# error at N. DDPM/PC need T = 1000: with fixed (small or large) variances a 100-step chain is
# itself biased (beta tilde omits the posterior spread of x0: -12% std at T = 100). Langevin
# needs n_steps * step_size >~ 10 per level, or low levels cannot shed the previous level's
# extra spread (+12% std measured at n_steps * step_size = 3).
ENOUGH = [
    ("ddim", 1000, 250, {}),
    ("ddpm", 1000, 500, {}),
    ("ddpm", 1000, 500, {"variance": "fixed_large"}),
    ("euler", 1000, 500, {}),
    ("heun", 100, 25, {}),
    ("dpmpp_2m", 100, 50, {}),
    ("langevin", 100, 40, {"n_steps": 25, "step_size": 0.5}),
    ("pc", 1000, 400, {}),
]


@pytest.mark.parametrize("name,T,steps,options", ENOUGH, ids=[f"{c[0]}-{c[2]}-{len(c[3])}" for c in ENOUGH])
def test_sampler_draws_from_the_mixture(name, T, steps, options):
    x = sample(
        mixture_denoiser(T),
        (N, 2),
        name,
        steps=steps,
        generator=torch.Generator().manual_seed(1),
        progress=False,
        dtype=torch.float64,
        **options,
    )
    assert_matches_mixture(x)


def test_distribution_check_accepts_the_truth_and_rejects_near_misses():
    """The check above can fail: it passes exact samples and rejects a 5-point weight shift,
    a 0.1 mean shift and a 20% variance error (each several SE at N)."""
    g = torch.Generator().manual_seed(3)
    assert_matches_mixture(MIXTURE.sample(N, g))
    w, mu, cov = MIXTURE.weights, MIXTURE.means, MIXTURE.covs
    near_misses = {
        "w0": GaussianMixture(w + torch.tensor([-0.05, 0.03, 0.02]), mu, cov),
        "mean2": GaussianMixture(w, mu + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.0]).view(3, 2), cov),
        "cov1": GaussianMixture(w, mu, cov * torch.tensor([1.0, 1.2, 1.0]).view(3, 1, 1)),
    }
    for key, wrong in near_misses.items():
        z = distribution_z_scores(wrong.sample(N, g))
        assert z[key] > 4.5, (key, z)


def test_too_few_steps_fail_the_distribution_check():
    """Negative control with a real sampler: 3 DDIM steps are visibly wrong."""
    x = sample(mixture_denoiser(), (N, 2), "ddim", steps=3, generator=torch.Generator().manual_seed(1), progress=False)
    assert max(distribution_z_scores(x).values()) > 10


# ---------------------------------------------------------------- exact law of a few-step chain
# The mixture check above cannot see a variance error below ~10% (N = 8000, z < 4.5), and at
# enough steps fixed-small and fixed-large DDPM both pass it, so a wrong posterior variance
# slips through. On *Gaussian* data with the exact denoiser every step is linear-Gaussian, so
# the law of what a chain of 10 steps returns is known exactly, although it is far from the
# data (fixed-small DDPM-10 returns ~40% of the data's variance): a sharp oracle for variances.
GAUSS_MU, GAUSS_COV = MIXTURE.means[0].double(), MIXTURE.covs[0].double()  # correlated, stds 0.5 / 0.2
GAUSS_N, GAUSS_STEPS = 100_000, 10  # SE of a variance entry ~0.45%: a 2% variance error is > 4.5 SE


def gaussian_chain_law(timesteps, sampler, variance="fixed_small", eta=0.0):
    """Exact mean and covariance of what DDPM (ancestral) or DDIM returns over `timesteps` on
    data N(mu, S) with the exact denoiser, from x_T ~ N(0, I). With a, a' the levels of a step:
    x0_hat = mu + K (x - sqrt(a) mu), K = sqrt(a) S (a S + (1 - a) I)^-1, and the step is
    x' = p x0_hat + q x + s z. DDPM: p, q the posterior mean's coefficients and s^2 = beta tilde
    (or beta) of the jump a -> a'; DDIM: x' = sqrt(a') x0_hat + c eps_hat + s z with s = eta
    sqrt(beta tilde), c = sqrt(1 - a' - s^2). The last step returns x0_hat. Levels come from
    the betas (cumprod), the coefficients from the papers: nothing from difflab's tables."""
    alpha_bar = torch.cumprod(1 - SCHEDULES[1000].betas, 0)[timesteps].tolist()
    mu, S = GAUSS_MU, GAUSS_COV
    eye = torch.eye(2, dtype=torch.float64)
    mean, cov = torch.zeros(2, dtype=torch.float64), eye.clone()
    for i, a in enumerate(alpha_bar):
        K = math.sqrt(a) * S @ torch.linalg.inv(a * S + (1 - a) * eye)
        if i == len(alpha_bar) - 1:
            return mu + K @ (mean - math.sqrt(a) * mu), K @ cov @ K.T
        a_next = alpha_bar[i + 1]
        beta = 1 - a / a_next
        beta_tilde = beta * (1 - a_next) / (1 - a)
        if sampler == "ddpm":
            p, q = math.sqrt(a_next) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_next) / (1 - a)
            s2 = beta_tilde if variance == "fixed_small" else beta
        else:  # eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a)
            s2 = eta**2 * beta_tilde
            c = math.sqrt(1 - a_next - s2)
            p, q = math.sqrt(a_next) - c * math.sqrt(a / (1 - a)), c / math.sqrt(1 - a)
        A = p * K + q * eye
        mean = A @ mean + p * (mu - math.sqrt(a) * K @ mu)
        cov = A @ cov @ A.T + s2 * eye


def gaussian_z_scores(x, mean, cov):
    """|error| / SE of each mean entry and each covariance entry of Gaussian samples x (N, 2)."""
    n = x.shape[0]
    z_mean = (x.mean(0) - mean).abs() / (cov.diagonal() / n).sqrt()
    z_cov = (torch.cov(x.T) - cov).abs() / ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    return torch.cat([z_mean, z_cov.flatten()[[0, 1, 3]]])


def gaussian_chain(name, seed=1, **options):
    data = GaussianMixture(torch.ones(1), GAUSS_MU[None], GAUSS_COV[None])
    den = MixtureDenoiser(data, SCHEDULES[1000])
    x = sample(den, (GAUSS_N, 2), name, steps=GAUSS_STEPS, spacing="linspace", dtype=torch.float64,
               generator=torch.Generator().manual_seed(seed), progress=False, **options)  # fmt: skip
    return x, get_timesteps(den.schedule, GAUSS_STEPS, "linspace")


CHAINS = [("ddpm", {}), ("ddpm", {"variance": "fixed_large"}), ("ddim", {"eta": 0.5})]


@pytest.mark.parametrize("name,options", CHAINS, ids=["ddpm-small", "ddpm-large", "ddim-eta0.5"])
def test_a_ten_step_chain_has_its_exact_law_on_gaussian_data(name, options):
    x, ts = gaussian_chain(name, **options)
    law = gaussian_chain_law(ts, name, options.get("variance", "fixed_small"), options.get("eta", 0.0))
    z = gaussian_z_scores(x, *law)
    assert z.max() < 4.5, (z.tolist(), law)
    assert (law[1] - GAUSS_COV).abs().max() > 0.05  # and that law is not the data's: the oracle is needed


def test_the_exact_law_check_rejects_a_wrong_posterior_variance_and_small_variance_errors():
    """Negative controls. DDPM with beta_t in place of beta tilde (fixed large) is rejected by the
    fixed-small law (and fits its own); exact draws with a 3% covariance error are rejected."""
    x, ts = gaussian_chain("ddpm", variance="fixed_large")
    assert gaussian_z_scores(x, *gaussian_chain_law(ts, "ddpm", "fixed_small")).max() > 50
    mean, cov = gaussian_chain_law(ts, "ddpm", "fixed_small")
    exact = GaussianMixture(torch.ones(1), mean[None], cov[None]).sample(GAUSS_N, torch.Generator().manual_seed(2))
    assert gaussian_z_scores(exact.double(), mean, cov).max() < 4.5
    near = GaussianMixture(torch.ones(1), mean[None], 1.03 * cov[None])
    assert gaussian_z_scores(near.sample(GAUSS_N, torch.Generator().manual_seed(2)).double(), mean, cov).max() > 4.5


def test_ddim_eta1_on_all_steps_is_ddpm_fixed_small():
    den = mixture_denoiser(100)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = get_timesteps(den.schedule, 100)
    a = ddim(den, x_T, ts, eta=1.0, generator=torch.Generator().manual_seed(5), progress=False)
    b = ddpm(den, x_T, ts, variance="fixed_small", generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the noise mattered: a different seed gives a different result
    c = ddpm(den, x_T, ts, generator=torch.Generator().manual_seed(6), progress=False)
    assert (c - b).abs().max() > 1e-2


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    den = mixture_denoiser(100)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = get_timesteps(den.schedule, 20)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    a = ddim(den, x_T, ts, generator=g, progress=False)
    assert torch.equal(g.get_state(), state)
    b = ddim(den, x_T, ts, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)


def test_ddim_inversion_round_trips():
    """x0 -> x_T -> x0 with deterministic DDIM. The plain inversion (eps at the lower point) is
    first order: the round trip error halves when the steps double; solving each step's
    implicit inverse by fixed-point iteration (`refine`) makes the round trip exact."""
    den = mixture_denoiser(100)
    x0 = MIXTURE.sample(256, torch.Generator().manual_seed(4))

    def round_trip(steps, refine=0):
        ts = get_timesteps(den.schedule, steps)
        x_T = ddim_invert(den, x0, ts, progress=False, refine=refine)
        return x_T, (ddim(den, x_T, ts, progress=False) - x0).abs()

    x_T, err100 = round_trip(100)
    # the latent is the data pushed through the flow map: a plausible N(0, I) draw
    assert x_T.mean().abs() < 0.15 and (x_T.std() - 1).abs() < 0.1
    _, err50 = round_trip(50)
    assert err100.median() < 0.03
    assert 0.4 < err100.median() / err50.median() < 0.6
    _, exact = round_trip(100, refine=10)
    assert exact.max() < 1e-5


def test_slerp_endpoints_norm_and_midpoint():
    g = torch.Generator().manual_seed(0)
    z0, z1 = (
        torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # orthogonal vectors: the angle is split evenly and the norm interpolates on the arc
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([[math.sqrt(0.5), math.sqrt(2.0)]]))
    u0, u1 = z0 / z0.flatten(1).norm(dim=1).view(-1, 1, 1), z1 / z1.flatten(1).norm(dim=1).view(-1, 1, 1)
    mid = slerp(u0, u1, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    # parallel vectors fall back to lerp instead of dividing by sin(0)
    torch.testing.assert_close(slerp(e0, 3 * e0, 0.5), 2 * e0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_samples(name):
    den = mixture_denoiser(100)
    kw = dict(steps=10, progress=False)
    a = sample(den, (16, 2), name, generator=torch.Generator().manual_seed(7), **kw)
    b = sample(den, (16, 2), name, generator=torch.Generator().manual_seed(7), **kw)
    c = sample(den, (16, 2), name, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_callback_sees_every_step_in_vp_coordinates():
    den = mixture_denoiser(100)
    seen = []
    x = sample(
        den,
        (8, 2),
        "euler",
        steps=6,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        callback=lambda i, t, x, p: seen.append((i, t, x.clone(), p.x0.clone())),
    )
    ts = get_timesteps(den.schedule, 6, default_spacing("euler", den.schedule)).tolist()
    assert [s[0] for s in seen] == list(range(6)) and [s[1] for s in seen] == ts
    assert torch.equal(seen[-1][2], x) and torch.equal(seen[-1][3], x)
    # intermediate states are VP: at level t the spread is ~ sqrt(ab var + 1 - ab) ~ 1, not sigma
    assert all(s[2].std() < 3 for s in seen)


def test_progress_flag_controls_tqdm(monkeypatch):
    import tqdm.auto

    def boom(*args, **kwargs):
        raise RuntimeError("tqdm used")

    monkeypatch.setattr(tqdm.auto, "trange", boom)
    den = mixture_denoiser(100)
    sample(den, (2, 2), "ddim", steps=3, progress=False)
    with pytest.raises(RuntimeError, match="tqdm used"):
        sample(den, (2, 2), "ddim", steps=3, progress=True)


def test_dtype_and_given_x_T():
    den = mixture_denoiser(100)
    x = sample(den, (4, 2), "ddim", steps=5, progress=False, dtype=torch.float64)
    assert x.dtype == torch.float64
    x_T = torch.randn(4, 2)
    a = sample(den, (4, 2), "ddim", steps=5, progress=False, x_T=x_T)
    assert torch.equal(a, ddim(den, x_T, get_timesteps(den.schedule, 5, DEFAULT_SPACING["ddim"]), progress=False))


def test_works_on_a_mixture_with_a_sample_shape():
    """Samplers are shape-agnostic: a 4-D mixture viewed as (1, 2, 2) images."""
    mix = GaussianMixture.isotropic(torch.ones(2), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, -1]]), std=0.2)
    den = MixtureDenoiser(mix, SCHEDULES[100], sample_shape=(1, 2, 2))
    for name in SAMPLERS:
        x = sample(den, (3, 1, 2, 2), name, steps=5, progress=False, generator=torch.Generator().manual_seed(0))
        assert x.shape == (3, 1, 2, 2) and torch.isfinite(x).all()


# ---------------------------------------------------------------- validation
def test_sample_validates_its_arguments():
    den = mixture_denoiser(100)
    kw = dict(progress=False)
    with pytest.raises(ValueError, match="allowed: ddpm, ddim, euler, heun, dpmpp_2m, langevin, pc"):
        sample(den, (2, 2), "plms", **kw)
    for steps in (0, 101, 2.5):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
            sample(den, (2, 2), "ddim", steps=steps, **kw)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample(den, (2, 2), "ddim", eta=-0.1, **kw)
    with pytest.raises(ValueError, match="eta applies only to sampler 'ddim'"):
        sample(den, (2, 2), "euler", eta=0.5, **kw)
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):
        sample(den, (2, 3), "ddim", **kw)
    with pytest.raises(ValueError, match="batch >= 1"):
        sample(den, (0, 2), "ddim", **kw)
    with pytest.raises(ValueError, match="list of 2 torch.Generators"):
        sample(den, (2, 2), "ddim", generator=[torch.Generator()], **kw)
    with pytest.raises(ValueError, match="allowed: eta"):
        sample(den, (2, 2), "ddim", snr=0.1, **kw)
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        sample(den, (2, 2), "ddim", spacing="uniform", **kw)
    with pytest.raises(ValueError, match="integer timesteps"):
        sample(den, (2, 2), "ddpm", spacing="karras", **kw)
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(den, (2, 2), "ddim", x_T=torch.zeros(3, 2), **kw)
    with pytest.raises(ValueError, match="unknown variance type"):
        sample(den, (2, 2), "ddpm", variance="fixed", **kw)
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        sample(den, (2, 2), "langevin", n_steps=0, **kw)
    with pytest.raises(ValueError, match="snr must be a finite number > 0"):
        sample(den, (2, 2), "pc", snr=-1.0, **kw)
    with pytest.raises(ValueError, match="strictly descending"):
        ddim(den, torch.zeros(2, 2), torch.tensor([3, 5, 1]), progress=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 99\]"):
        ddim(den, torch.zeros(2, 2), torch.tensor([100, 5]), progress=False)


def test_default_spacing_follows_the_top_of_the_schedule():
    """Euler and DPM-Solver++(2M) step uniformly from a moderate sigma_max (linear, ~157) but
    come down gradually from an extreme one (cosine, ~2e4); the others do not depend on it."""
    linear, cosine = Schedule.make("linear", T=1000), Schedule.make("cosine", T=1000)
    assert default_spacing("euler", linear) == default_spacing("dpmpp_2m", linear) == "trailing"
    assert default_spacing("euler", cosine) == "karras" and default_spacing("dpmpp_2m", cosine) == "geometric"
    for name in ("ddim", "heun", "unipc"):
        assert default_spacing(name, linear) == default_spacing(name, cosine) == DEFAULT_SPACING[name]
    _, ts, _ = sampling_plan(cosine, "euler", 8)
    torch.testing.assert_close(ts, get_timesteps(cosine, 8, "karras"))
