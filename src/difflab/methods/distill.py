"""Progressive distillation (Salimans & Ho 2022): a student learns to take in one
deterministic DDIM step what its teacher takes in two; each round's student is the next
round's teacher, so the number of steps halves every round (N -> N/2 -> ... -> 1).

A round is described by the teacher's grid: 2K descending timesteps u_0 > ... > u_{2K-1},
followed by the clean end t = -1. The student's grid is every other level, u_0, u_2, ...,
u_{2K-2}: its step j goes from u_{2j} to u_{2j+2} (or to clean data), passing over the
teacher's intermediate level u_{2j+1}. "trailing" grids (first level T-1, where sampling
starts from pure noise) nest exactly: every other level of trailing(2K) is trailing(K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.losses import mean_flat
from difflab.process import Prediction, check_data, q_sample
from difflab.samplers.steps import ddim_step
from difflab.samplers.timesteps import get_timesteps
from difflab.schedules import Schedule, broadcast


def teacher_grid(schedule: Schedule, steps: int) -> Tensor:
    """The teacher's descending timesteps for a round whose teacher takes `steps` (even) steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2 or steps % 2:
        raise ValueError(f"a distillation teacher takes an even number of steps >= 2, got {steps!r}")
    return get_timesteps(schedule, steps, "trailing")


def student_grid(grid: Tensor) -> Tensor:
    """Every other level of the teacher's grid: the student's timesteps (half as many)."""
    grid = torch.as_tensor(grid)
    if grid.ndim != 1 or grid.numel() < 2 or grid.numel() % 2:
        raise ValueError(f"a teacher grid has an even number >= 2 of levels, got {grid.tolist()}")
    return grid[::2].clone()


def with_clean_end(grid: Tensor) -> Tensor:
    """The grid followed by t = -1 (clean data), as fractional indices."""
    return torch.cat([torch.as_tensor(grid, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)])


def distillation_target(
    teacher: Denoiser, z_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor, cond: dict | None = None
) -> tuple[Tensor, Tensor]:
    """(x_target, z_s): two deterministic DDIM steps of the teacher, t -> t_mid -> t_next (per
    example), and the clean image x~ from which ONE DDIM step at t lands exactly on their
    result z_s:  x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),
    alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). At the clean end (sigma_s = 0) x~ = z_s."""
    schedule = teacher.schedule
    a_mid = schedule.alpha_bar_at(t_mid).to(z_t.device)
    a_t, a_s = schedule.alpha_bar_at(t).to(z_t.device), schedule.alpha_bar_at(t_next).to(z_t.device)
    z_mid = ddim_step(teacher(z_t, t, cond), a_mid)
    z_s = ddim_step(teacher(z_mid, t_mid, cond), a_s)
    ratio = ((1.0 - a_s) / (1.0 - a_t)).sqrt()  # sigma_s / sigma_t
    x_target = (z_s - broadcast(ratio, z_t) * z_t) / broadcast(a_s.sqrt() - ratio * a_t.sqrt(), z_t)
    return x_target, z_s


def truncated_snr_weight(alpha_bar: Tensor) -> Tensor:
    """The paper's weighting of the x-space loss: max(SNR, 1) = max(alpha^2 / sigma^2, 1)."""
    return (alpha_bar / (1.0 - alpha_bar)).clamp(min=1.0)


def distillation_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    grid: Tensor,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example loss of one round: each example gets a student step j (uniform), is noised
    to u_{2j}, and the student's x0_hat is pulled towards the teacher's two-step target x~ with
    weight max(SNR, 1). `grid` is the teacher's grid (2K levels)."""
    x0 = check_data(x0)
    levels = with_clean_end(grid)
    steps = student_grid(grid).numel()
    batch = x0.shape[0]
    j = torch.randint(0, steps, (batch,), generator=generator)
    t, t_mid, t_next = levels[2 * j], levels[2 * j + 1], levels[2 * j + 2]
    t, t_mid, t_next = (v.to(x0.device) for v in (t, t_mid, t_next))
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    z_t = q_sample(student.schedule, x0, t, eps)
    with torch.no_grad():
        x_target, _ = distillation_target(teacher, z_t, t, t_mid, t_next, cond)
    pred: Prediction = student(z_t, t, cond)
    weight = truncated_snr_weight(student.schedule.alpha_bar_at(t).to(x0.device))
    losses = weight.to(x0.dtype) * mean_flat((pred.x0 - x_target) ** 2)
    return losses, {"mse_x0": mean_flat((pred.x0 - x_target) ** 2)}
