"""Continuous-time training (Song et al. 2021): the VP and sub-VP SDEs as schedules, fractional
timesteps uniform on [0, T - 1], and a recipe that trains with them."""

from __future__ import annotations

import pytest
import torch

from difflab.losses import ContinuousTimesteps, DiffusionLoss, UniformTimesteps
from difflab.methods.sde import VPSDE, SubVPSDE
from difflab.pipelines import Pipeline
from difflab.process import Prediction
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.config import Config
from difflab.train.tasks import DataInfo
from difflab.train.tasks.diffusion import DiffusionTask
from test_train_support import tiny_config

F64 = torch.float64


def grid_times(T: int) -> torch.Tensor:
    return torch.arange(1, T + 1, dtype=F64) / T  # u = (t + 1) / T


def test_vp_schedule_is_the_vp_sde_at_the_grid():
    """alpha_bar_t = mean_coef(u)^2 of `VPSDE`, with the paper's default and with other betas.
    Negative control: DDPM's linear schedule (the SDE's Euler discretisation) is off by > 1e-4."""
    u = grid_times(1000)
    vp = Schedule.make("vp", T=1000)
    torch.testing.assert_close(vp.alpha_bar, VPSDE().mean_coef(u) ** 2, rtol=1e-12, atol=1e-300)
    other = Schedule.make("vp", T=50, beta_min=1.0, beta_max=5.0)
    torch.testing.assert_close(other.alpha_bar, VPSDE(1.0, 5.0).mean_coef(grid_times(50)) ** 2, rtol=1e-12, atol=0)
    linear = Schedule.make("linear", T=1000).alpha_bar
    assert (linear / vp.alpha_bar - 1).abs().max() > 1e-4


def test_subvp_schedule_has_the_subvp_noise_levels():
    """The sub-VP marginal m x0 + s eps has VE noise level s / m; the "subvp" schedule has the
    same level at every grid point, so `sigma_to_t` maps the SDE's time u to t = u T - 1 exactly.
    Negative control: the VP schedule with the same betas has larger noise levels (u <= 1/2)."""
    T = 1000
    u = grid_times(T)
    sub, sde = Schedule.make("subvp", T=T), SubVPSDE()
    level = sde.std(u) / sde.mean_coef(u)
    torch.testing.assert_close(sub.sigmas, level, rtol=1e-8, atol=0)  # 1 - alpha_bar ~ 1e-8 at u = 1/T
    picked = u[[0, 9, 499, 998]]
    t = sub.sigma_to_t(sde.std(picked) / sde.mean_coef(picked))
    torch.testing.assert_close(t, picked * T - 1, rtol=0, atol=1e-6)
    vp_levels = Schedule.make("vp", T=T).sigmas
    assert (vp_levels[: T // 2] > sub.sigmas[: T // 2] * 1.01).all()  # they meet near u = 1, where s -> 1


def test_sde_schedules_refuse_bad_betas_and_rebuild_from_their_config():
    with pytest.raises(ValueError, match="beta_min"):
        Schedule.make("subvp", T=10, beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="takes no option"):
        Schedule.make("vp", T=10, s=0.008)
    made = Schedule.make("subvp", T=64, beta_min=0.2, beta_max=10.0)
    rebuilt = Schedule.from_config(made.to_config())
    assert torch.equal(rebuilt.alpha_bar, made.alpha_bar)


def test_continuous_timesteps_are_uniform_on_zero_to_T_minus_1():
    """Kolmogorov-Smirnov distance to U[0, T - 1] below the 1% critical value 1.63 / sqrt(n).
    Negative controls: the discrete sampler's draws are all integers (no fractional time), and
    U[0, T) (one step too far) fails the same KS bound."""
    n, T = 20_000, 10
    gen = torch.Generator().manual_seed(0)
    t, w = ContinuousTimesteps(T).sample(n, "cpu", gen)
    assert t.dtype == F64 and torch.equal(w, torch.ones(n))
    assert 0 <= t.min() and t.max() <= T - 1 and (t != t.round()).float().mean() == 1.0

    def ks(sample: torch.Tensor) -> float:
        s = sample.sort().values / (T - 1)
        ecdf = torch.arange(1, n + 1, dtype=F64) / n
        return float(torch.maximum((ecdf - s).abs(), (s - (ecdf - 1 / n)).abs()).max())

    bound = 1.63 / n**0.5
    assert ks(t) < bound
    assert ks(torch.rand(n, generator=gen, dtype=F64) * T) > bound
    discrete, _ = UniformTimesteps(T).sample(n, "cpu", gen)
    assert (discrete == discrete.round()).all()


class ZeroX0:
    """An eps-denoiser whose x0 estimate is 0: eps_hat = x_t / sqrt(1 - alpha_bar(t))."""

    prediction, variance = "eps", "fixed_small"

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def __call__(self, x_t, t, cond=None):
        ab = self.schedule.alpha_bar_at(t)
        return Prediction.from_output("eps", x_t / (1 - ab).sqrt().reshape(-1, 1), x_t, ab)


def test_continuous_loss_noises_and_reads_the_same_fractional_level():
    """With x0_hat = 0, eps_hat - eps = sqrt(SNR(t)) x0, so each example's loss is SNR(t) |x0|^2 / d
    at its own fractional t (alpha_bar interpolated between the grid points) to 1e-10.
    Negative control: the SNR of the rounded-down t is off, so noising at floor(t) would show."""
    schedule = Schedule.make("cosine", T=50)
    x0 = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    objective = DiffusionLoss(schedule, "simple", time="continuous")
    loss, logs = objective(ZeroX0(schedule), x0, generator=torch.Generator().manual_seed(2))
    t = logs["t"]
    assert t.is_floating_point() and (t != t.round()).all()
    snr = lambda ab: ab / (1 - ab)  # noqa: E731
    expected = snr(schedule.alpha_bar_at(t)) * (x0**2).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    floored = snr(schedule.alpha_bar_at(t.floor())) * (x0**2).mean(1)
    assert ((floored - loss).abs() / loss).max() > 1e-3


def test_continuous_time_refuses_the_bound_and_importance_sampling():
    schedule = Schedule.make("linear", T=20)
    with pytest.raises(ValueError, match="continuous time"):
        DiffusionLoss(schedule, "hybrid", time="continuous")
    with pytest.raises(ValueError, match="continuous time"):
        DiffusionLoss(schedule, "simple", importance=True, time="continuous")
    with pytest.raises(ValueError, match="unknown time 'fractional'"):
        DiffusionLoss(schedule, time="fractional")
    raw = tiny_config().to_dict()
    raw["diffusion"].update(time="continuous", loss_type="vlb", variance="learned")
    with pytest.raises(ValueError, match="diffusion.time"):
        Config.from_dict(raw)


def test_a_subvp_continuous_recipe_trains_and_samples(tmp_path):
    """End to end: the recipe's objective draws fractional t, the model folder keeps the sub-VP
    schedule, and it samples with an ODE sampler (Heun between the grid points)."""

    config = tiny_config(diffusion={"schedule": "subvp", "T": 100, "time": "continuous"})
    task = DiffusionTask(config, DataInfo(sample_shape=(1, 8, 8)))
    assert isinstance(task.objective.timesteps, ContinuousTimesteps)
    pipe = Pipeline.from_pretrained(run(config, tmp_path / "run") / "model")
    assert torch.equal(pipe.denoiser.schedule.alpha_bar, Schedule.make("subvp", T=100).alpha_bar)
    images = pipe.generate(2, sampler="heun", steps=4, seed=0)
    assert images.shape[0] == 2 and torch.isfinite(images).all()
