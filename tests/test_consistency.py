"""Consistency models' math (methods/consistency.py): the boundary condition exactly, the
level schedules at their ends, the CT/CD pairs, shared dropout masks, and a consistency model
distilled from an exact mixture teacher that maps noise to the mixture in one step."""

import copy
import math

import pytest
import torch
from torch import nn

from difflab.denoiser import Denoiser, MixtureDenoiser, build_denoiser
from difflab.methods.consistency import (
    ConsistencyDenoiser,
    ConsistencyLoss,
    boundary_scalings,
    ct_ema_decay,
    ct_num_levels,
    ict_num_levels,
    karras_levels,
    lognormal_pair_probs,
    pseudo_huber,
)
from difflab.mixture import GaussianMixture
from difflab.nets import MLP
from difflab.process import Prediction
from difflab.samplers import sample
from difflab.samplers.steps import heun_step
from difflab.schedules import Schedule

SCHEDULE = Schedule.make("cosine", T=1000)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, t, cond=None):
        return self.lin(x) + 0.01 * t[:, None]


def test_boundary_condition_holds_exactly_at_sigma_min():
    sigma_min = float(SCHEDULE.sigmas[0])
    c_skip, c_out, _ = boundary_scalings(torch.tensor([sigma_min], dtype=torch.float64), 0.5, sigma_min)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # exactly, not approximately
    # EDM's scalings (sigma instead of sigma - sigma_min) would not be the identity there
    edm_skip = 0.25 / (sigma_min**2 + 0.25)
    assert edm_skip != 1.0
    c_skip, c_out, _ = boundary_scalings(torch.tensor([80.0]), 0.5, sigma_min)
    assert c_skip.item() < 1e-4 and c_out.item() == pytest.approx(0.5 * (80 - sigma_min) / math.sqrt(0.25 + 6400))


def test_a_consistency_denoiser_is_the_identity_at_the_first_level_whatever_its_network():
    torch.manual_seed(0)
    den = ConsistencyDenoiser(Net().double(), SCHEDULE, sample_shape=(2,), sigma_data=0.5)
    x_t = torch.randn(6, 2, dtype=torch.float64)
    a0 = SCHEDULE.alpha_bar_at(torch.tensor(0))
    pred = den(x_t, torch.zeros(6))
    assert torch.equal(pred.x0, x_t / a0.sqrt())  # f(x, sigma_min) = x in VE coordinates
    later = den(x_t, torch.full((6,), 5.0))
    assert (later.x0 - x_t / SCHEDULE.alpha_bar_at(torch.tensor(5.0)).sqrt()).abs().max() > 1e-3


def test_the_consistency_parameterisation_loads_through_the_denoiser_factory():
    den = build_denoiser(Net(), SCHEDULE, "consistency", sample_shape=(2,), sigma_data=0.7)
    assert isinstance(den, ConsistencyDenoiser) and den.sigma_data == 0.7
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
        build_denoiser(Net(), SCHEDULE, "consistency", sigma_data=0.0)


def test_ct_schedules_at_the_start_and_the_end_of_training():
    K = 800
    assert ct_num_levels(0, K) == 2 and ct_num_levels(K, K) == 151  # s0 and s1 + 1
    assert ct_ema_decay(0, K) == pytest.approx(0.9, rel=1e-12)  # exp(s0 log mu0 / N(0)) = mu0
    assert ct_ema_decay(K, K) == pytest.approx(0.9 ** (2 / 151), rel=1e-12)
    levels = [ct_num_levels(k, K) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(levels, levels[1:]))
    # iCT: 10 -> 1280 doubling, stages of K' = floor(K / (log2(128) + 1)) = K // 8 steps
    assert ict_num_levels(0, K) == 11 and ict_num_levels(K, K) == 1281
    assert ict_num_levels(K // 8 - 1, K) == 11 and ict_num_levels(K // 8, K) == 21
    with pytest.raises(ValueError, match="0 <= k <= K"):
        ct_num_levels(K + 1, K)


def test_karras_levels_span_the_schedule_ascending():
    levels = karras_levels(SCHEDULE, 18)
    assert levels[0] == 0 and levels[-1] == SCHEDULE.T - 1 and (levels.diff() > 0).all()
    sig = SCHEDULE.sigma_at(levels)
    rho = 7.0  # the Karras ladder is linear in sigma^(1/rho)
    ramp = torch.linspace(sig[0] ** (1 / rho), sig[-1] ** (1 / rho), 18, dtype=torch.float64)
    torch.testing.assert_close(sig ** (1 / rho), ramp)


def test_lognormal_pair_probabilities_are_the_lognormal_mass_between_levels():
    sigmas = torch.tensor([0.002, 0.1, 0.33, 1.0, 5.0, 80.0], dtype=torch.float64)
    p = lognormal_pair_probs(sigmas)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    mass = torch.tensor([cdf(b) - cdf(a) for a, b in zip(sigmas.tolist(), sigmas[1:].tolist())])
    torch.testing.assert_close(p, (mass / mass.sum()).double())


def test_pseudo_huber_is_zero_at_zero_and_l1_like_far_away():
    x = torch.zeros(2, 3)
    assert pseudo_huber(x, x, 0.01).abs().max() == 0
    far = torch.full((2, 3), 10.0)
    torch.testing.assert_close(pseudo_huber(far, x, 0.01), torch.full((2,), math.sqrt(300) - 0.01))


class Recording(Denoiser):
    """Records what it was called with; predicts x0 = 0."""

    def __init__(self, schedule):
        self.schedule, self.calls, self.sample_shape = schedule, [], (2,)

    def predict(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return Prediction.from_x0(torch.zeros_like(x_t), x_t, self.schedule.alpha_bar_at(t))


def test_consistency_training_pairs_share_one_noise_draw():
    online, target = Recording(SCHEDULE), Recording(SCHEDULE)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    ConsistencyLoss(karras_levels(SCHEDULE, 10))(online, target, x0, generator=torch.Generator().manual_seed(0))
    (x_hi, t_hi), (x_lo, t_lo) = online.calls[0], target.calls[0]
    assert (t_hi > t_lo).all()
    z_hi = (x_hi / SCHEDULE.alpha_bar_at(t_hi).sqrt()[:, None] - x0) / SCHEDULE.sigma_at(t_hi)[:, None]
    z_lo = (x_lo / SCHEDULE.alpha_bar_at(t_lo).sqrt()[:, None] - x0) / SCHEDULE.sigma_at(t_lo)[:, None]
    torch.testing.assert_close(z_hi, z_lo)  # x_n = x + sigma_n z and x_{n+1} = x + sigma_{n+1} z, one z
    assert 0.8 < z_hi.std().item() < 1.2


def test_consistency_distillation_pairs_are_one_heun_step_of_the_teacher():
    mixture = GaussianMixture.isotropic(torch.ones(2), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), std=0.3)
    teacher = MixtureDenoiser(mixture, SCHEDULE)
    online, target = Recording(SCHEDULE), Recording(SCHEDULE)
    x0 = mixture.sample(32, generator=torch.Generator().manual_seed(2))
    ConsistencyLoss(karras_levels(SCHEDULE, 10))(online, target, x0, generator=torch.Generator(), teacher=teacher)
    (x_hi, t_hi), (x_lo, t_lo) = online.calls[0], target.calls[0]
    expected, _ = heun_step(teacher, x_hi, t_hi, t_lo)
    torch.testing.assert_close(x_lo, expected, atol=1e-12, rtol=0)


def test_online_and_target_passes_see_the_same_dropout_masks():
    class DropoutNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.masks = []

        def forward(self, x, t, cond=None):
            mask = self.drop(torch.ones_like(x))
            self.masks.append(mask)
            return mask

    online_net = DropoutNet().train()
    target_net = copy.deepcopy(online_net)
    online = ConsistencyDenoiser(online_net, SCHEDULE, sample_shape=(2,))
    target = ConsistencyDenoiser(target_net, SCHEDULE, sample_shape=(2,))
    ConsistencyLoss(karras_levels(SCHEDULE, 10))(online, target, torch.randn(256, 2), generator=torch.Generator())
    a, b = online_net.masks[0], target_net.masks[0]
    assert 0.3 < (a == 0).float().mean() < 0.7  # dropout is really on
    assert torch.equal(a, b)


def test_inverse_gap_weighting_divides_by_the_level_gap():
    online, target = Recording(SCHEDULE), Recording(SCHEDULE)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    plain, _ = ConsistencyLoss(karras_levels(SCHEDULE, 6))(online, target, x0, generator=g)
    online2, target2 = Recording(SCHEDULE), Recording(SCHEDULE)
    weighted, _ = ConsistencyLoss(karras_levels(SCHEDULE, 6), weighting="inverse_gap")(
        online2, target2, x0, generator=torch.Generator().manual_seed(4)
    )
    gap = SCHEDULE.sigma_at(online2.calls[0][1]) - SCHEDULE.sigma_at(target2.calls[0][1])
    torch.testing.assert_close(weighted, plain / gap)


@pytest.mark.slow
def test_a_distilled_consistency_model_maps_noise_to_the_mixture_in_one_step():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2])
    mixture = GaussianMixture.isotropic(weights, means, std=0.15)
    teacher = MixtureDenoiser(mixture, SCHEDULE)
    net = MLP(in_features=2, hidden=128, depth=2)
    online = ConsistencyDenoiser(net, SCHEDULE, sample_shape=(2,), sigma_data=1.0)
    target = ConsistencyDenoiser(copy.deepcopy(net).requires_grad_(False), SCHEDULE, sample_shape=(2,), sigma_data=1.0)

    def one_step_shares(den):
        x = sample(den, (4000, 2), "consistency", 1, generator=torch.Generator().manual_seed(1), progress=False)
        d = torch.cdist(x.double(), means)
        return torch.bincount(d.argmin(1), minlength=3).double() / 4000, d.min(1).values.mean().item()

    before, spread_before = one_step_shares(target)
    loss = ConsistencyLoss(karras_levels(SCHEDULE, 25))
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        x0 = mixture.sample(256, generator=g).float()
        losses, _ = loss(online, target, x0, generator=g, teacher=teacher)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        with torch.no_grad():  # target network: EMA of the online one, mu = 0.9
            for p, q in zip(target.net.parameters(), net.parameters()):
                p.lerp_(q, 0.1)
    shares, spread = one_step_shares(target)
    # mode weights within 4 points (binomial sd at n = 4000: 0.8 points), and samples near the modes:
    # mean distance to the nearest mode < 0.6 (measured 0.44; an untrained model is far off; the data's own
    # is 0.19, one step of a consistency model is blurrier than the data)
    assert (shares - weights.double()).abs().max() < 0.04, shares
    assert spread < 0.6, spread
    assert (before - weights.double()).abs().max() > 0.1 or spread_before > 1.0  # the negative control
