import pytest
import torch

from difflab.process import (
    Prediction,
    check_data,
    model_log_variance,
    posterior_mean_var,
    q_mean_var,
    q_sample,
    q_step,
)
from difflab.schedules import Schedule


@pytest.fixture
def sched():
    # built per test (cheap), not per module: a mutation run attributes the build to every test using it
    return Schedule.make("linear", T=200)


def test_composed_one_step_chain_matches_closed_form_exactly(sched):
    """q_step is linear in (x_prev, eps), so the chain's t-step law follows exactly from its
    coefficients: push the mean coefficient and the noise std through q_step itself, compare
    with q_sample / q_mean_var and with the closed form from the betas (prod of alphas)."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    coef, var = one.clone(), zero.clone()
    alpha_bar = 1.0
    for t in range(sched.T):
        tt = torch.tensor([t])
        step_noise = q_step(sched, zero, tt, one)  # sqrt(beta_t): the std one step adds
        coef = q_step(sched, coef, tt, zero)  # sqrt(1 - beta_t) * coef
        var = q_step(sched, var.sqrt(), tt, zero) ** 2 + step_noise**2
        alpha_bar *= 1.0 - sched.betas[t].item()  # independent of the schedule's own tables
        assert coef.item() == pytest.approx(alpha_bar**0.5, rel=1e-12)
        assert var.item() == pytest.approx(1 - alpha_bar, rel=1e-10)
        assert q_sample(sched, one, tt, zero).item() == pytest.approx(coef.item(), rel=1e-12)
        assert q_sample(sched, zero, tt, one).item() == pytest.approx(var.sqrt().item(), rel=1e-10)
        mean, q_var = q_mean_var(sched, one, tt)
        assert mean.item() == pytest.approx(coef.item(), rel=1e-12)
        assert q_var.item() == pytest.approx(var.item(), rel=1e-10)


def test_composed_one_step_chain_matches_closed_form_by_sampling(sched):
    n, steps = 200_000, 60
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(steps):
        x = q_step(sched, x, torch.full((n,), t), torch.randn(n, generator=g, dtype=torch.float64))
    mean, var = q_mean_var(sched, x0[:1], torch.tensor([steps - 1]))
    # 6 standard errors: mean's se = sqrt(var / n); var's se ~ var * sqrt(2 / n)
    assert abs(x.mean().item() - mean.item()) < 6 * (var.item() / n) ** 0.5
    assert abs(x.var().item() - var.item()) < 6 * var.item() * (2 / n) ** 0.5
    direct = q_sample(sched, x0, torch.full((n,), steps - 1), torch.randn(n, generator=g, dtype=torch.float64))
    assert abs(direct.mean().item() - x.mean().item()) < 8 * (var.item() / n) ** 0.5


@pytest.mark.parametrize("t", [0, 1, 17, 199])
def test_posterior_matches_formulas_in_both_forms(sched, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 3, dtype=torch.float64, generator=g)
    tt = torch.full((4,), t)
    x_t = q_sample(sched, x0, tt, eps)
    mean, var, logvar = posterior_mean_var(sched, x0, x_t, tt)
    a, ab = sched.alphas[t], sched.alpha_bar[t]
    ab_prev = sched.alpha_bar_prev[t]
    beta = sched.betas[t]
    # via x0: sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(a) (1 - ab_prev) / (1 - ab) x_t
    via_x0 = ab_prev.sqrt() * beta / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    # via eps: (x_t - beta / sqrt(1 - ab) eps) / sqrt(a)
    via_eps = (x_t - beta / (1 - ab).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(mean, via_x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, via_eps, rtol=1e-10, atol=1e-12)
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    torch.testing.assert_close(var.flatten()[0], beta_tilde, rtol=1e-12, atol=1e-300)
    if t > 0:
        # Bayes: precision adds up; independent of the coefficient formulas above
        precision = 1 / (1 - ab_prev) + a / beta
        bayes_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + a.sqrt() * x_t / beta) / precision
        torch.testing.assert_close(mean, bayes_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var.flatten()[0], 1 / precision, rtol=1e-9, atol=0)
        torch.testing.assert_close(logvar.flatten()[0], torch.log(beta_tilde), rtol=1e-12, atol=0)
    else:
        # beta tilde is 0 at the first step: its log is clipped to the next step's value
        assert var.flatten()[0].item() == 0.0
        assert logvar.flatten()[0].item() == pytest.approx(torch.log(sched.posterior_variance[1]).item())


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_conversions_round_trip(sched, kind):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 5, 50, 120, 199])
    ab = sched.alpha_bar_at(t)
    x_t = q_sample(sched, x0, t, eps)
    truth = Prediction(x0=x0, eps=eps)
    out = truth.target(kind, ab)
    pred = Prediction.from_output(kind, out, x_t, ab)
    tol = dict(rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(pred.x0, x0, **tol)
    torch.testing.assert_close(pred.eps, eps, **tol)
    torch.testing.assert_close(pred.v(ab), truth.v(ab), **tol)
    # score = -eps / sqrt(1 - ab), and back
    back = Prediction.from_score(pred.score(ab), x_t, ab)
    torch.testing.assert_close(back.eps, eps, **tol)
    # v is the x_t-rotation: v = sqrt(ab) eps - sqrt(1 - ab) x0
    a = ab.view(-1, 1, 1, 1)
    torch.testing.assert_close(truth.v(ab), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_learned_variance_interpolates_between_beta_tilde_and_beta(sched):
    t = torch.tensor([0, 3, 150])
    like = torch.zeros(3, 2)
    small = model_log_variance(sched, t, "fixed_small", like)
    large_ref = torch.log(sched.betas[t]).view(-1, 1).expand(3, 2).float()
    torch.testing.assert_close(model_log_variance(sched, t, "learned", like, torch.zeros(3, 2)), small)
    torch.testing.assert_close(model_log_variance(sched, t, "learned", like, torch.ones(3, 2)), large_ref)
    half = model_log_variance(sched, t, "learned", like, torch.full((3, 2), 0.5))
    torch.testing.assert_close(half, 0.5 * (small + large_ref))
    large = model_log_variance(sched, t, "fixed_large", like)
    torch.testing.assert_close(large[1:], large_ref[1:])
    torch.testing.assert_close(large[0], small[0])  # beta tilde at t = 0 keeps the decoder sharp


def test_bad_inputs_name_what_is_allowed(sched):
    with pytest.raises(ValueError, match="allowed: eps, x0, v"):
        Prediction.from_output("score", torch.zeros(1), torch.zeros(1), torch.tensor(0.5))
    with pytest.raises(ValueError, match="allowed: fixed_small, fixed_large, learned"):
        model_log_variance(sched, torch.tensor([1]), "huge", torch.zeros(1))
    with pytest.raises(ValueError, match="floating-point .* got dtype torch.uint8"):
        check_data(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN or inf"):
        check_data(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="needs the network's variance output"):
        model_log_variance(sched, torch.tensor([1]), "learned", torch.zeros(1))


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_a_lazy_prediction_combines_like_its_parts_and_refuses_a_changed_x_t(kind):
    """x0 and eps are computed on first read; `combine` goes straight from (x_t, output) and
    must equal c_x0 x0 + c_eps eps; a read after x_t changed in place is refused, not wrong."""
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    c_x0, c_eps = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0.7
    fused = Prediction.from_output(kind, out, x_t, a).combine(c_x0, c_eps)
    pred = Prediction.from_output(kind, out, x_t, a)
    torch.testing.assert_close(fused, c_x0[:, None] * pred.x0 + c_eps * pred.eps, rtol=1e-12, atol=1e-12)
    lazy = Prediction.from_output(kind, out, x_t, a)
    x_t.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place before the prediction was read"):
        lazy.combine(1.0, 1.0)
