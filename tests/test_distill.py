"""Progressive distillation's math (methods/distill.py), checked with an exact teacher: the
Gaussian-mixture denoiser, so every identity holds to float64 round-off."""

import pytest
import torch

from difflab.denoiser import MixtureDenoiser
from difflab.methods.distill import (
    distillation_loss,
    distillation_target,
    student_grid,
    teacher_grid,
    truncated_snr_weight,
    with_clean_end,
)
from difflab.mixture import GaussianMixture
from difflab.process import Prediction, q_sample
from difflab.samplers import ddim
from difflab.samplers.steps import ddim_step
from difflab.schedules import Schedule

SCHEDULE = Schedule.make("cosine", T=64)
MIXTURE = GaussianMixture.isotropic(
    torch.tensor([0.4, 0.6]), torch.tensor([[-1.0, 0.5, 0.0], [0.8, -0.5, 0.3]], dtype=torch.float64), std=0.3
)
TEACHER = MixtureDenoiser(MIXTURE, SCHEDULE)


def _noisy(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MIXTURE.sample(len(t), generator=g)
    return q_sample(SCHEDULE, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))


def _round(grid, j):
    levels = with_clean_end(grid)
    return levels[2 * j], levels[2 * j + 1], levels[2 * j + 2]


def test_one_student_ddim_step_from_the_target_lands_on_the_teachers_two_steps():
    grid = teacher_grid(SCHEDULE, 16)
    j = torch.tensor([0, 1, 3, 5, 7, 7, 2, 4])  # step 7 ends on clean data
    t, t_mid, t_next = _round(grid, j)
    z_t = _noisy(t)
    x_target, z_s = distillation_target(TEACHER, z_t, t, t_mid, t_next)
    a_t, a_s = SCHEDULE.alpha_bar_at(t), SCHEDULE.alpha_bar_at(t_next)
    student_step = ddim_step(Prediction.from_x0(x_target, z_t, a_t), a_s)
    torch.testing.assert_close(student_step, z_s, atol=1e-10, rtol=0)
    # negative control: one teacher step over the whole interval is not the two-step result
    one_step = ddim_step(TEACHER(z_t, t), a_s)
    assert (one_step - z_s).abs().max() > 1e-3


def test_the_target_of_the_last_step_is_the_teachers_clean_estimate():
    grid = teacher_grid(SCHEDULE, 4)
    t, t_mid, t_next = _round(grid, torch.full((5,), 1))
    assert (t_next == -1).all()
    z_t = _noisy(t, seed=3)
    x_target, z_s = distillation_target(TEACHER, z_t, t, t_mid, t_next)
    z_mid = ddim_step(TEACHER(z_t, t), SCHEDULE.alpha_bar_at(t_mid))
    torch.testing.assert_close(x_target, TEACHER(z_mid, t_mid).x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_target, z_s, atol=1e-12, rtol=0)


def test_the_first_round_target_is_what_two_steps_of_the_ddim_sampler_give():
    # N = T / 2: the teacher takes every timestep, the student every other one
    grid = teacher_grid(SCHEDULE, SCHEDULE.T)
    assert grid.tolist() == list(range(SCHEDULE.T - 1, -1, -1))
    t, t_mid, t_next = _round(grid, torch.tensor([3]))
    z_t = _noisy(t, seed=5)
    seen = {}
    ddim(TEACHER, z_t, torch.tensor([int(t), int(t_mid), int(t_next)]), progress=False,
         callback=lambda i, tt, x, p: seen.setdefault(i, x))  # fmt: skip
    _, z_s = distillation_target(TEACHER, z_t, t, t_mid, t_next)
    torch.testing.assert_close(z_s, seen[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("steps", [2, 8, 64])
def test_the_grid_halves_each_round_and_rounds_nest(steps):
    grid = teacher_grid(SCHEDULE, steps)
    assert grid.numel() == steps and grid[0] == SCHEDULE.T - 1  # sampling starts from pure noise
    student = student_grid(grid)
    assert student.numel() == steps // 2
    if steps > 2:
        assert torch.equal(student, teacher_grid(SCHEDULE, steps // 2))  # the next round's teacher grid
    else:
        assert student.tolist() == [SCHEDULE.T - 1]  # one step from pure noise


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="even number of steps >= 2, got 3"):
        teacher_grid(SCHEDULE, 3)
    with pytest.raises(ValueError, match="even number >= 2 of levels"):
        student_grid(torch.tensor([9, 5, 2]))


def test_truncated_snr_weight_is_max_of_snr_and_one():
    a = torch.tensor([0.8, 0.5, 0.3, 0.99], dtype=torch.float64)
    torch.testing.assert_close(truncated_snr_weight(a), torch.tensor([4.0, 1.0, 1.0, 99.0], dtype=torch.float64))


def test_a_student_equal_to_its_target_has_zero_loss_and_a_wrong_one_does_not():
    grid = teacher_grid(SCHEDULE, 8)
    x0 = MIXTURE.sample(16, generator=torch.Generator().manual_seed(1))

    class Perfect(MixtureDenoiser):  # predicts exactly the two-step target (a cheat that knows the teacher)
        def predict(self, x_t, t, cond):
            levels = with_clean_end(grid)
            idx = torch.searchsorted(-levels, -t.to(torch.float64))
            x_target, _ = distillation_target(TEACHER, x_t, t, levels[idx + 1], levels[idx + 2])
            return Prediction.from_x0(x_target, x_t, SCHEDULE.alpha_bar_at(t))

    losses, logs = distillation_loss(Perfect(MIXTURE, SCHEDULE), TEACHER, x0, grid, generator=torch.Generator())
    assert losses.shape == (16,) and losses.abs().max() < 1e-20
    wrong, _ = distillation_loss(TEACHER, TEACHER, x0, grid, generator=torch.Generator())
    assert wrong.min() > 0 and torch.isfinite(wrong).all()
