import math

import pytest
import torch
from torch import nn

from difflab.denoiser import Denoiser, NetworkDenoiser
from difflab.losses import (
    DiffusionLoss,
    ImportanceTimesteps,
    discretized_gaussian_log_likelihood,
    nll_bits_per_dim,
    normal_kl,
    prior_bpd,
    snr_weight,
    vlb_term,
)
from difflab.process import Prediction, q_sample
from difflab.schedules import Schedule


class OracleDenoiser(Denoiser):
    """Knows the clean batch: predicts x0 exactly (or, with zeros=True, always 0)."""

    def __init__(self, schedule, x0, zeros=False):
        self.schedule, self.x0, self.zeros = schedule, x0, zeros

    def predict(self, x_t, t, cond):
        x0 = torch.zeros_like(x_t) if self.zeros else self.x0
        return Prediction.from_x0(x0, x_t, self.schedule.alpha_bar_at(t))


def eight_bit_batch(n=6, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).double() / 127.5 - 1


def test_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-15


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(2.0)
    x = m1 + math.exp(lv1 / 2) * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    log_p = -0.5 * (lv1 + (x - m1) ** 2 / math.exp(lv1))
    log_q = -0.5 * (lv2 + (x - m2) ** 2 / math.exp(lv2))
    mc = (log_p - log_q).mean().item()
    exact = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    se = (log_p - log_q).std().item() / 1000
    assert abs(mc - exact) < 5 * se


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.9, -1.0), (-0.2, 0.5), (1.3, -6.0)])
def test_discretized_decoder_sums_to_one_over_256_bins(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    ll = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
    assert torch.exp(ll).sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.isfinite(ll).all()


def test_prior_term_is_the_closed_form_kl():
    s = Schedule.make("linear", T=1000)
    x0 = eight_bit_batch()
    ab = s.alpha_bar[-1]
    expected = 0.5 * ((1 - ab) + ab * x0**2 - 1 - torch.log(1 - ab))
    torch.testing.assert_close(prior_bpd(s, x0), expected.flatten(1).mean(1) / math.log(2))
    assert prior_bpd(s, x0).max().item() < 1e-3  # the linear schedule really ends at noise


def test_bound_with_exact_x0_is_finite_and_below_a_zero_denoiser():
    s = Schedule.make("linear", T=100)
    x0 = eight_bit_batch()
    good = nll_bits_per_dim(OracleDenoiser(s, x0), x0, generator=torch.Generator().manual_seed(0))
    bad = nll_bits_per_dim(OracleDenoiser(s, x0, zeros=True), x0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(good["total"]).all()
    assert (good["total"] < bad["total"]).all()
    # knowing x0 makes every KL term vanish (same fixed-small variance as the posterior)
    assert good["vb"][:, 1:].abs().max().item() < 1e-9
    # what is left is the decoder L_0, whose variance (beta tilde clipped at t = 0) is fixed
    assert (good["total"] - good["vb"][:, 0] - good["prior"]).abs().max().item() < 1e-9
    torch.testing.assert_close(good["total"], good["vb"].sum(1) + good["prior"])


def test_vlb_kl_term_equals_closed_form_for_a_wrong_mean():
    s = Schedule.make("cosine", T=50)
    g = torch.Generator().manual_seed(3)
    x0, eps = eight_bit_batch(4), torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 10, 20, 49])
    x_t = q_sample(s, x0, t, eps)
    wrong_x0 = x0 + 0.1
    vb = vlb_term(s, Prediction.from_x0(wrong_x0, x_t, s.alpha_bar_at(t)), x0, x_t, t, "fixed_small")
    # same variance: KL = (mu1 - mu2)^2 / (2 var) with mu1 - mu2 = coef_x0 * 0.1. The expectation is
    # built from the betas alone (not the schedule's own posterior tables, which it would share bugs with)
    beta = s.betas[t]
    ab = torch.cumprod(1 - s.betas, 0)[t]
    ab_prev = ab / (1 - beta)
    coef = ab_prev.sqrt() * beta / (1 - ab)
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    expected = (coef * 0.1) ** 2 / (2 * beta_tilde) / math.log(2)
    torch.testing.assert_close(vb, expected, rtol=1e-8, atol=0)
    # near miss: the same KL under beta_t (fixed large) in place of beta tilde is off by > 5% at
    # t = 5, 10, 20 (at t = 49 the two variances nearly agree)
    near_miss = (coef * 0.1) ** 2 / (2 * beta) / math.log(2)
    assert ((near_miss - vb).abs() / vb)[:3].min() > 0.05


class TinyNet(nn.Module):
    """Per-pixel MLP conditioned on t: enough to test gradient routing in the losses."""

    def __init__(self, out_channels=1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, out_channels))

    def forward(self, x, t, cond=None):
        tt = (t.float() / 100).view(-1, 1, 1, 1).expand_as(x)
        h = torch.stack([x, tt], -1)
        return self.mlp(h).squeeze(-1) if self.mlp[-1].out_features == 1 else self.mlp(h).movedim(-1, 1).flatten(1, 2)


def test_hybrid_loss_stops_the_bound_gradient_on_the_mean():
    torch.manual_seed(0)
    s = Schedule.make("linear", T=100)
    net = TinyNet(out_channels=2)  # (eps, v) for one channel
    den = NetworkDenoiser(net, s, prediction="eps", variance="learned")
    x0 = eight_bit_batch(8).float()
    hybrid = DiffusionLoss(s, loss_type="hybrid")
    simple = DiffusionLoss(s, loss_type="simple")
    # gradient of the total hybrid loss w.r.t. the eps output = gradient of L_simple alone
    out = {}

    def capture(module, inp, output):
        output.retain_grad()
        out["o"] = output

    net.mlp.register_forward_hook(capture)
    loss_h, logs = hybrid(den, x0, generator=torch.Generator().manual_seed(1))
    loss_h.mean().backward()
    grad_h = out["o"].grad.clone()
    net.zero_grad()
    loss_s, _ = simple(den, x0, generator=torch.Generator().manual_seed(1))
    loss_s.mean().backward()
    grad_s = out["o"].grad.clone()
    torch.testing.assert_close(grad_h[..., 0], grad_s[..., 0], rtol=1e-5, atol=1e-7)  # the mean channel
    assert grad_h[..., 1].abs().sum() > 0 and grad_s[..., 1].abs().sum() == 0  # only the bound trains v
    # L_hybrid = L_simple + 0.001 * T * L_t
    torch.testing.assert_close(loss_h, logs["mse"] + 0.001 * s.T * logs["vb"].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_targets_and_min_snr_weights_agree_in_x0_space(target):
    """Each target's MSE is the x0 MSE times a known SNR factor, so min-SNR weighting makes
    all three the same loss: min(SNR, gamma) * ||x0_hat - x0||^2."""
    s = Schedule.make("linear", T=100)
    x0 = eight_bit_batch(8).float()
    offset = 0.05

    class Shifted(Denoiser):
        schedule, prediction = s, target

        def predict(self, x_t, t, cond):
            truth_x0 = x0  # a fixed error in x0 space
            return Prediction.from_x0(truth_x0 + offset, x_t, s.alpha_bar_at(t))

    loss = DiffusionLoss(s, target=target, weighting="min_snr", snr_gamma=5.0)
    val, logs = loss(Shifted(), x0, generator=torch.Generator().manual_seed(0))
    ab = s.alpha_bar_at(logs["t"])
    snr = ab / (1 - ab)
    expected = snr.clamp(max=5.0) * offset**2
    torch.testing.assert_close(val.double(), expected, rtol=1e-3, atol=1e-7)
    assert snr_weight(torch.tensor([0.0], dtype=torch.float64), target, 5.0).isfinite().all()


def test_importance_sampler_is_uniform_until_warm_then_follows_losses():
    imp = ImportanceTimesteps(T=4, history=10, uniform_prob=0.0)
    for _ in range(9):
        imp.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(imp.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    imp.update(torch.arange(3), torch.tensor([1.0, 2.0, 3.0]))
    assert not imp.warmed_up()  # t = 3 has 9 values only
    imp.update(torch.tensor([3]), torch.tensor([4.0]))
    p = imp.probabilities()
    torch.testing.assert_close(p, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10)
    # importance weights 1/(T p_t) keep the estimate unbiased: E[w L] = mean(L)
    t, w = imp.sample(200_000, "cpu", torch.Generator().manual_seed(0))
    est = (w.double() * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[t]).mean().item()
    assert est == pytest.approx(2.5, rel=0.01)
    # a restored sampler is warm at once: same counts, same history, same probabilities
    again = ImportanceTimesteps(T=4, history=10, uniform_prob=0.0)
    assert not again.warmed_up()
    again.load_state_dict(imp.state_dict())
    assert again.warmed_up() and torch.equal(again.counts, imp.counts) and torch.equal(again.losses, imp.losses)
    torch.testing.assert_close(again.probabilities(), p, rtol=0, atol=1e-15)


def test_importance_sampler_keeps_the_last_history_losses_and_mixes_in_uniform_mass():
    """Once a t has `history` losses, a new one pushes out the oldest; p_t ∝ sqrt(mean L^2)
    (not the mean of L), mixed with uniform_prob / T."""
    imp = ImportanceTimesteps(T=2, history=2, uniform_prob=0.2)
    imp.update(torch.tensor([0, 0, 1, 1]), torch.tensor([9.0, 3.0, 1.0, 1.0]))
    imp.update(torch.tensor([0]), torch.tensor([4.0]))  # history of t = 0 is now [3, 4]
    assert imp.losses[0].tolist() == [3.0, 4.0] and imp.counts.tolist() == [2, 2]
    rms = torch.tensor([math.sqrt((9 + 16) / 2), 1.0], dtype=torch.float64)
    expected = rms / rms.sum() * 0.8 + 0.2 / 2
    torch.testing.assert_close(imp.probabilities(), expected, rtol=0, atol=1e-15)
    t, w = imp.sample(1000, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, (1.0 / (2 * expected[t])).float())  # weights 1 / (T p_t)
    share = (t == 0).double().mean().item()  # drawn with p: 5 binomial SE
    assert abs(share - expected[0].item()) < 5 * math.sqrt(expected[0].item() * expected[1].item() / 1000)


def test_bad_loss_configuration_and_data():
    s = Schedule.make("linear", T=10)
    with pytest.raises(ValueError, match="allowed: simple, hybrid, vlb"):
        DiffusionLoss(s, loss_type="l1")
    with pytest.raises(ValueError, match="allowed: eps, x0, v"):
        DiffusionLoss(s, target="score")
    with pytest.raises(ValueError, match="allowed: none, min_snr"):
        DiffusionLoss(s, weighting="p2")
    den = OracleDenoiser(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="got dtype torch.int64"):
        DiffusionLoss(s)(den, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or inf"):
        DiffusionLoss(s)(den, torch.tensor([[0.0, float("inf"), 0.0]] * 2))
