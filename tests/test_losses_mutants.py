"""Behaviour of difflab.losses that the mutation run (benchmarks/mutation.py) showed untested:
the decoder likelihood and L_0 against an erf-based closed form, the random draws of the
objectives (which t, which noise, from which generator), the loss types' scales, defaults,
importance-sampling wiring, dtypes and the progress bar of nll_bits_per_dim."""

import math

import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.losses import (
    DiffusionLoss,
    ImportanceTimesteps,
    UniformTimesteps,
    discretized_gaussian_log_likelihood,
    nll_bits_per_dim,
    prior_bpd,
    vlb_term,
)
from difflab.process import Prediction, q_sample
from difflab.schedules import Schedule

LN2 = math.log(2.0)


def eight_bit_batch(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1).to(dtype)


def reference_log_likelihood(x: float, mean: float, std: float) -> float:
    """log P(bin of x) under N(mean, std^2), 8-bit bins of width 2/255, open-ended edge bins (math.erf)."""

    def cdf(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    upper, lower = (x - mean + 1 / 255) / std, (x - mean - 1 / 255) / std
    if x < -0.999:
        return math.log(cdf(upper))
    if x > 0.999:
        return math.log(1.0 - cdf(lower))
    return math.log(cdf(upper) - cdf(lower))


def closed_form_tables(s: Schedule):
    """alpha_bar, the x0 coefficient of the posterior mean and beta tilde, from the betas alone."""
    beta = s.betas.double()
    ab = torch.cumprod(1 - beta, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    return ab, coef_x0, beta_tilde


def expected_bound_terms(s: Schedule, x0: torch.Tensor, offset: float, t: torch.Tensor) -> torch.Tensor:
    """Per-example L_{t-1} (bits/dim) for a denoiser whose x0 is off by `offset`, fixed-small variance:
    the KL (coef_x0 * offset)^2 / (2 beta tilde) for t > 0, the decoder NLL (erf) at t = 0."""
    _, coef_x0, beta_tilde = closed_form_tables(s)
    out = []
    for b, tb in enumerate(t.tolist()):
        if tb > 0:
            out.append((coef_x0[tb] * offset) ** 2 / (2 * beta_tilde[tb]) / LN2)
        else:  # t = 0: the mean is x0 itself, the variance beta tilde clipped to its t = 1 value
            std = math.sqrt(beta_tilde[1].item())
            lls = [reference_log_likelihood(v, v + offset, std) for v in x0[b].flatten().tolist()]
            out.append(torch.tensor(-sum(lls) / len(lls) / LN2, dtype=torch.float64))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in out])


class Recorder(Denoiser):
    """Predicts x0 + offset (for the clean batch it knows) and records every call."""

    variance = "fixed_small"

    def __init__(self, schedule, x0, offset=0.05, prediction="x0"):
        self.schedule, self.x0, self.offset, self.prediction = schedule, x0, offset, prediction
        self.calls = []

    def predict(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return Prediction.from_x0(self.x0 + self.offset, x_t, self.schedule.alpha_bar_at(t))


# ---------------------------------------------------------------- decoder and bound terms
@pytest.mark.parametrize("mean_shift, log_scale", [(0.0, -4.0), (0.01, -5.0), (-0.03, -3.0)])
def test_discretized_log_likelihood_matches_the_erf_closed_form(mean_shift, log_scale):
    x = torch.tensor([-1.0, -1 + 2 / 255, -0.2, 0.0, 0.5, 1 - 2 / 255, 1.0], dtype=torch.float64)
    mean = x + mean_shift
    ll = discretized_gaussian_log_likelihood(x, mean, torch.tensor(log_scale, dtype=torch.float64))
    std = math.exp(log_scale)
    expected = [reference_log_likelihood(v, m, std) for v, m in zip(x.tolist(), mean.tolist())]
    torch.testing.assert_close(ll, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_decoder_term_at_t0_is_the_bits_per_dim_nll_of_the_discretized_gaussian():
    s = Schedule.make("linear", T=100)
    x0 = eight_bit_batch((3, 2, 2, 2))
    t = torch.zeros(3, dtype=torch.long)
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    pred = Prediction.from_x0(x0 + 0.004, x_t, s.alpha_bar_at(t))
    vb = vlb_term(s, pred, x0, x_t, t, "fixed_small")
    torch.testing.assert_close(vb, expected_bound_terms(s, x0, 0.004, t), rtol=1e-7, atol=0)


def test_vlb_term_keeps_the_float32_dtype_of_float32_data():
    s = Schedule.make("linear", T=100)
    x0 = eight_bit_batch((2, 1, 2, 2), dtype=torch.float32)
    t = torch.tensor([0, 5])
    x_t = q_sample(s, x0, t, torch.zeros_like(x0))
    vb = vlb_term(s, Prediction.from_x0(x0, x_t, s.alpha_bar_at(t)), x0, x_t, t, "fixed_small")
    assert vb.dtype == torch.float32


def test_prior_term_of_float32_multichannel_data_is_the_float64_closed_form():
    """L_T is computed in float64 whatever the data's dtype (in float32 the ~1e-5 KL cancels away)."""
    s = Schedule.make("linear", T=1000)
    x0 = eight_bit_batch((4, 3, 2, 2), dtype=torch.float32)
    ab = closed_form_tables(s)[0][-1]
    x = x0.double()
    expected = (0.5 * ((1 - ab) + ab * x**2 - 1 - torch.log(1 - ab))).flatten(1).mean(1) / LN2
    got = prior_bpd(s, x0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------- nll_bits_per_dim
def test_nll_bits_per_dim_visits_every_t_once_with_the_generators_noise_and_sums_the_closed_forms():
    s = Schedule.make("linear", T=12)
    x0 = eight_bit_batch((3, 2, 2, 2), seed=4)
    den, cond = Recorder(s, x0, offset=0.05), {"label": torch.tensor([1, 2, 3])}
    out = nll_bits_per_dim(den, x0, cond, generator=torch.Generator().manual_seed(7))
    # t = T-1 down to 0, once each, for the whole batch, with cond passed on
    assert [c[1].tolist() for c in den.calls] == [[i] * 3 for i in range(s.T - 1, -1, -1)]
    assert all(c[2] is cond for c in den.calls)
    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, eps drawn from the generator in x0's dtype, in that order
    ab = closed_form_tables(s)[0]
    g = torch.Generator().manual_seed(7)
    for x_t, t, _ in den.calls:
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a = ab[t[0]]
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-12, atol=1e-12)
    # every term from its closed form, the x0 MSE, and the total; all reported in float64
    for i in range(s.T):
        expected = expected_bound_terms(s, x0, 0.05, torch.full((3,), i))
        torch.testing.assert_close(out["vb"][:, i], expected, rtol=1e-7, atol=1e-14)  # KL ~1e-12 near T
    torch.testing.assert_close(out["x0_mse"], torch.full((3, s.T), 0.05**2, dtype=torch.float64))
    torch.testing.assert_close(out["prior"], prior_bpd(s, x0))
    torch.testing.assert_close(out["total"], out["vb"].sum(1) + out["prior"], rtol=1e-12, atol=0)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(("total", "prior", "vb", "x0_mse"), torch.float64)


def test_nll_bits_per_dim_shows_a_labelled_transient_progress_bar_only_when_asked(capsys):
    s = Schedule.make("linear", T=5)
    x0 = eight_bit_batch((2, 1, 2, 2))
    nll_bits_per_dim(Recorder(s, x0), x0)
    assert capsys.readouterr().err == ""
    nll_bits_per_dim(Recorder(s, x0), x0, progress=True)
    err = capsys.readouterr().err
    assert "\rbits/dim:" in err  # the bar is labelled
    assert "\n" not in err  # leave=False: the finished bar is erased, not left on screen


# ---------------------------------------------------------------- DiffusionLoss
def test_loss_draws_t_then_noise_in_the_datas_dtype_from_the_generator_and_passes_cond():
    s = Schedule.make("linear", T=50)
    x0 = eight_bit_batch((4, 3, 2, 2), seed=2)
    den, cond = Recorder(s, x0), {"y": torch.arange(4)}
    loss, logs = DiffusionLoss(s)(den, x0, cond, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, s.T, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ((x_t, t_seen, cond_seen),) = den.calls
    assert torch.equal(t_seen, t) and torch.equal(logs["t"], t) and cond_seen is cond
    a = closed_form_tables(s)[0][t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, torch.full((4,), 0.05**2, dtype=torch.float64))  # x0 MSE of the offset


def test_uniform_timesteps_cover_zero_to_T_minus_one_evenly_with_unit_weights():
    t, w = UniformTimesteps(5).sample(5000, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=5)
    assert counts.numel() == 5 and (counts > 0).all()
    assert ((counts - 1000).abs() < 5 * math.sqrt(5000 * 0.2 * 0.8)).all()
    assert torch.equal(w, torch.ones(5000))


@pytest.mark.parametrize("loss_type", ["vlb", "hybrid"])
def test_vlb_loss_is_T_times_the_bound_term_and_hybrid_scales_it_by_lambda(loss_type):
    s = Schedule.make("linear", T=40)
    x0 = eight_bit_batch((6, 1, 2, 2), seed=5)
    loss, logs = DiffusionLoss(s, loss_type=loss_type, lambda_vlb=0.01)(
        Recorder(s, x0, offset=0.02), x0, generator=torch.Generator().manual_seed(0)
    )
    expected_vb = expected_bound_terms(s, x0, 0.02, logs["t"])
    torch.testing.assert_close(logs["vb"].double(), expected_vb, rtol=1e-6, atol=0)
    if loss_type == "vlb":
        assert "mse" not in logs
        torch.testing.assert_close(loss.double(), s.T * expected_vb, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(loss.double(), 0.02**2 + 0.01 * s.T * expected_vb, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type", ["simple", "hybrid", "vlb"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_float32_data_gives_a_float32_loss(loss_type, weighting):
    s = Schedule.make("linear", T=20)
    x0 = eight_bit_batch((3, 2, 2, 2), dtype=torch.float32)
    loss, _ = DiffusionLoss(s, loss_type=loss_type, weighting=weighting)(Recorder(s, x0), x0)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb"])
def test_bfloat16_data_gets_the_bound_scaled_and_added_in_float32(loss_type):
    """T * L_t is large (T = 40 here); scaling it in bfloat16 would cost ~3 significant digits."""
    s = Schedule.make("linear", T=40)
    x0 = eight_bit_batch((16, 1, 2, 2), dtype=torch.bfloat16)
    loss, logs = DiffusionLoss(s, loss_type=loss_type, lambda_vlb=0.3)(
        Recorder(s, x0, offset=0.25), x0, generator=torch.Generator().manual_seed(0)
    )
    assert loss.dtype == logs["vb"].dtype == torch.float32
    scale = s.T * (0.3 if loss_type == "hybrid" else 1.0)
    simple = logs["mse"].float() if loss_type == "hybrid" else 0.0
    torch.testing.assert_close(loss, simple + scale * logs["vb"].float(), rtol=1e-6, atol=0)


def test_min_snr_weighting_defaults_to_gamma_5():
    s = Schedule.make("linear", T=100)
    x0 = eight_bit_batch((64, 1, 2, 2))
    loss, logs = DiffusionLoss(s, target="x0", weighting="min_snr")(
        Recorder(s, x0, offset=0.1), x0, generator=torch.Generator().manual_seed(0)
    )
    ab = closed_form_tables(s)[0][logs["t"]]
    snr = ab / (1 - ab)
    assert (snr > 5).any() and (snr < 5).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(loss, snr.clamp(max=5.0) * 0.1**2, rtol=1e-9, atol=0)


def test_snr_gamma_must_be_positive():
    s = Schedule.make("linear", T=10)
    for bad in (0, -1.5):
        with pytest.raises(ValueError, match=rf"^snr_gamma must be > 0, got {bad}$"):
            DiffusionLoss(s, snr_gamma=bad)
    for fine in (0.5, 1):
        assert DiffusionLoss(s, snr_gamma=fine).snr_gamma == fine


def test_importance_sampling_learns_from_the_losses_and_reweights_only_when_asked():
    s = Schedule.make("linear", T=4)
    x0 = eight_bit_batch((64, 1, 2, 2))
    g = torch.Generator().manual_seed(0)
    den = Recorder(s, x0, offset=0.1, prediction="eps")  # eps-MSE varies strongly with t
    plain = DiffusionLoss(s)  # default: uniform t, unit weights, even after T * history losses
    for _ in range(3):
        loss, logs = plain(den, x0, generator=g)
        assert torch.equal(loss, logs["mse"])
    imp = DiffusionLoss(s, importance=True)
    seen_t, seen_loss = [], []
    for _ in range(2):
        loss, logs = imp(den, x0, generator=g)
        seen_t.append(logs["t"])
        seen_loss.append(logs["mse"])
    # every example's (unweighted) loss went into the sampler's history of its t
    t_all, l_all = torch.cat(seen_t), torch.cat(seen_loss)
    assert imp.timesteps.counts.tolist() == torch.bincount(t_all, minlength=4).clamp(max=10).tolist()
    for ti in range(4):
        torch.testing.assert_close(imp.timesteps.losses[ti], l_all[t_all == ti][:10].double())
    assert imp.timesteps.warmed_up()
    p = imp.timesteps.probabilities()
    assert p.max() / p.min() > 2
    loss, logs = imp(den, x0, generator=g)
    torch.testing.assert_close(loss, logs["mse"] / (4 * p[logs["t"]]).to(loss.dtype))


def test_importance_timesteps_defaults_history_10_and_uniform_mass_1e_3():
    imp = ImportanceTimesteps(T=3)
    for _ in range(9):
        imp.update(torch.arange(3), torch.tensor([1.0, 2.0, 3.0]))
    assert not imp.warmed_up()
    imp.update(torch.arange(3), torch.tensor([1.0, 2.0, 3.0]))
    assert imp.warmed_up()
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6 * 0.999 + 0.001 / 3
    torch.testing.assert_close(imp.probabilities(), expected, rtol=0, atol=1e-15)


def test_importance_timesteps_history_is_a_sliding_window_of_the_latest_losses():
    imp = ImportanceTimesteps(T=1, history=3)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        imp.update(torch.tensor([0]), torch.tensor([value]))
    assert imp.losses[0].tolist() == [3.0, 4.0, 5.0]


def test_importance_timesteps_draw_from_the_given_generator_only():
    imp = ImportanceTimesteps(T=4)
    torch.manual_seed(0)
    first, _ = imp.sample(200, "cpu", torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    again, _ = imp.sample(200, "cpu", torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


@pytest.mark.parametrize("loss_type", ["simple", "hybrid", "vlb"])
def test_every_loss_type_keeps_float64_data_in_float64(loss_type):
    """The bound alone used to come back float32 for float64 data (its accumulator took the
    default dtype); all three losses now share one rule: at least float32, float64 kept."""
    s = Schedule.make("linear", T=20)
    x0 = eight_bit_batch((3, 2, 2, 2), dtype=torch.float64)
    loss, _ = DiffusionLoss(s, loss_type=loss_type)(Recorder(s, x0), x0, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float64
