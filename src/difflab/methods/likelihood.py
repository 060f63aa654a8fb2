"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Appendix D.2),
by the instantaneous change of variables of continuous normalising flows (Chen et al. 2018).

Along a solution x(u) of dx/du = f_ode(x, u) (`SDE.ode_drift`), d log p_u(x(u)) / du =
-div f_ode(x(u), u). Integrating d/du [x, delta] = [f_ode, div f_ode] from the data end
u = u_start (delta = 0) to u = u_end gives

    log p_{u_start}(x) = log p_prior(x(u_end)) + delta(u_end).

The divergence is exact (trace of the Jacobian: one backward pass per dimension, for tests
and low dimension) or Hutchinson's estimate v^T (df/dx) v with a Rademacher probe v, via one
vector-Jacobian product per evaluation. The probe is drawn once per solve and kept for the
whole trajectory: the integrand is then a smooth function of u, which the adaptive solver
needs, and the integral is still unbiased (x(u) does not depend on v, so E_v[int v^T J v] =
int tr J). The solvers (fixed-step RK4, adaptive Dormand-Prince RK45) are written here, so
there is no torchdiffeq or scipy dependency.

For 8-bit images, `ode_bits_per_dim` dequantises and converts densities on [-1, 1] to
bits/dim of the 256 discrete levels (see `dequantized_bits_per_dim` for the offset).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.denoiser import device_of
from difflab.methods.sde import SDE, ScheduleSDE, Score, score_from_denoiser

DIVERGENCES = ("hutchinson", "exact")
SOLVERS = ("rk45", "rk4")
LOG_BINS_PER_UNIT = math.log(128.0)  # 256 bins of width 2/256 on [-1, 1]: log(1 / width) per dim

Rhs = Callable[[float, Tensor], Tensor]


# ---------------------------------------------------------------- divergence
def rademacher(shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Entries +1 or -1 with probability 1/2 each (drawn on the CPU, so a seed gives the same probe anywhere)."""
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype)


def divergence_hutchinson(fn: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """(f(x), v^T (df/dx) v) per example, for fn acting on each example separately.

    One vector-Jacobian product: grad_x <f(x), v> = v^T J, then dotted with v. The estimate is
    unbiased for the trace when E[v v^T] = I (Rademacher: also least variance among such v).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x)
        (vjp,) = torch.autograd.grad(f, x, grad_outputs=probe.to(f))
    return f.detach(), (vjp * probe).flatten(1).sum(1)


def divergence_exact(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(f(x), tr(df/dx)) per example: one backward pass per dimension (D of them).

    Summing f[:, i] over the batch gives each example's own row, which assumes fn treats
    examples independently (true for denoisers; batch norm in training mode would break it).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x)
        flat = f.flatten(1)
        div = torch.zeros(x.shape[0], dtype=f.dtype, device=f.device)
        for i in range(flat.shape[1]):
            (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
            div = div + row.flatten(1)[:, i]
    return f.detach(), div


# ---------------------------------------------------------------- ODE solvers
def solve_rk4(fn: Rhs, y0: Tensor, u0: float, u1: float, steps: int = 100) -> tuple[Tensor, int]:
    """Classic fixed-step Runge-Kutta 4 for dy/du = fn(u, y) from u0 to u1: (y(u1), NFE = 4 steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    grid = [u0 + (u1 - u0) * i / steps for i in range(steps)] + [u1]  # ends exactly at u1
    y = y0
    for u, u_next in zip(grid[:-1], grid[1:]):
        h, mid = u_next - u, (u + u_next) / 2
        k1 = fn(u, y)
        k2 = fn(mid, y + h / 2 * k1)
        k3 = fn(mid, y + h / 2 * k2)
        k4 = fn(u_next, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, 4 * steps


# Dormand & Prince (1980) RK5(4)7M: nodes, stages, 5th-order weights (also the 7th stage's row,
# "first same as last") and 4th-order weights for the error estimate
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def solve_rk45(
    fn: Rhs,
    y0: Tensor,
    u0: float,
    u1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 10_000,
) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince RK45 for dy/du = fn(u, y) from u0 to u1: (y(u1), NFE).

    Defaults rtol = atol = 1e-5 are Song et al.'s likelihood settings (scipy's RK45 there). The
    error of a step is the RMS over all entries of (y5 - y4) / (atol + rtol max(|y|, |y_new|)),
    one step size for the whole batch; a step is kept when that is <= 1, and the next step is
    h * clip(0.9 err^(-1/5), 0.2, 10). The first step is Hairer's 0.01 ||y0|| / ||f(y0)|| (scaled
    norms) unless given. More than `max_steps` attempted steps is an error, never a silent stop.
    """
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {tol!r}")
    span = u1 - u0
    if span == 0:
        return y0, 0
    direction = 1.0 if span > 0 else -1.0
    y, u = y0, u0
    k1 = fn(u, y)
    nfe = 1

    def rms(z: Tensor) -> float:
        return float(z.pow(2).mean().sqrt())

    if first_step is None:
        scale = atol + rtol * y.abs()
        d0, d1 = rms(y / scale), rms(k1 / scale)
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    else:
        h = float(first_step)
    h = min(abs(h), abs(span))
    for _ in range(max_steps):
        if direction * (u1 - u) <= 0:
            return y, nfe
        h = min(h, direction * (u1 - u))
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            yi = y + hs * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ui = u + _DP_C[i] * hs
            ks.append(fn(u1 if direction * (ui - u1) > 0 else ui, yi))  # no rounding past u1
        nfe += 6
        y_new = y + hs * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)  # = the 7th stage's input
        err = hs * sum((b5 - b4) * k for b5, b4, k in zip(_DP_B5, _DP_B4, ks))
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        ratio = rms(err / scale)
        if not math.isfinite(ratio):
            raise FloatingPointError(f"RK45: non-finite values at u = {u:.6g} (step {hs:.3g})")
        if ratio <= 1.0:
            u = u1 if h >= direction * (u1 - u) else u + hs
            y, k1 = y_new, ks[6]  # first same as last
        h = h * min(10.0, max(0.2, 0.9 * (ratio if ratio > 0 else 1e-10) ** -0.2))
    raise RuntimeError(
        f"RK45 took more than max_steps={max_steps} steps (reached u = {u:.6g} of {u1}); loosen rtol/atol"
    )


# ---------------------------------------------------------------- log-likelihood
def ode_log_likelihood(
    score: Score,
    sde: SDE,
    x: Tensor,
    *,
    u_start: float = 1e-5,
    u_end: float = 1.0,
    divergence: str = "hutchinson",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    generator: torch.Generator | None = None,
    probe: Tensor | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """log p_{u_start}(x) per example (nats) of the model given by `score` and `sde`.

    Solves d/du [x, delta] = [f_ode(x, u), div f_ode(x, u)] from u_start to u_end with `solver`
    ("rk45": rtol/atol; "rk4": `steps` fixed steps) and adds the prior: log p = prior_logp(x(u_end))
    + delta, with `sde.prior_logp` (N(0, I), or N(0, sigma_max^2 I) for VE) unless given.
    `divergence` is "hutchinson" (one Rademacher probe per example, drawn once from `generator`
    unless `probe` is given) or "exact". The ODE runs in `dtype` (float64 by default; a network
    denoiser still runs in its own dtype). Returns {"logp", "prior_logp", "delta_logp" (B,),
    "x_end" (the latent), "nfe"}.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if not 0 <= u_start < u_end <= 1:
        raise ValueError(f"need 0 <= u_start < u_end <= 1, got u_start={u_start!r}, u_end={u_end!r}")
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a tensor of shape (B >= 1, ...), got {getattr(x, 'shape', type(x).__name__)}")
    x = x.to(dtype)
    B, shape, D = x.shape[0], x.shape, x[0].numel()
    if divergence == "hutchinson":
        probe = rademacher(tuple(shape), generator, dtype) if probe is None else probe.to(dtype)
        if probe.shape != shape:
            raise ValueError(f"probe must have x's shape {tuple(shape)}, got {tuple(probe.shape)}")
        probe = probe.to(x.device)

    def rhs(u: float, y: Tensor) -> Tensor:
        xu = y[:, :D].reshape(shape)
        t = torch.full((B,), u, dtype=torch.float64, device=x.device)

        def drift(z: Tensor) -> Tensor:
            return sde.ode_drift(z, t, score(z, t))

        if divergence == "exact":
            f, div = divergence_exact(drift, xu)
        else:
            f, div = divergence_hutchinson(drift, xu, probe)
        return torch.cat([f.flatten(1), div.to(y)[:, None]], 1)

    y0 = torch.cat([x.flatten(1), x.new_zeros(B, 1)], 1)
    if solver == "rk45":
        y1, nfe = solve_rk45(rhs, y0, float(u_start), float(u_end), rtol=rtol, atol=atol)
    else:
        y1, nfe = solve_rk4(rhs, y0, float(u_start), float(u_end), steps=steps)
    x_end, delta = y1[:, :D].reshape(shape), y1[:, D]
    prior = (sde.prior_logp if prior_logp is None else prior_logp)(x_end).to(delta)
    return {"logp": prior + delta, "prior_logp": prior, "delta_logp": delta, "x_end": x_end, "nfe": nfe}


# ---------------------------------------------------------------- 8-bit images
def to_levels(x: Tensor) -> Tensor:
    """8-bit levels k in 0..255 (int64) of uint8 images, or of float images on difflab's grid
    x = k / 127.5 - 1 (as `difflab.data.images` makes them); anything off that grid is refused."""
    if not isinstance(x, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.long()
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 levels or floats k / 127.5 - 1, got dtype {x.dtype}")
    k = ((x.double() + 1.0) * 127.5).round()
    off = float((x.double() - (k / 127.5 - 1.0)).abs().max()) if x.numel() else 0.0
    if not torch.isfinite(x).all() or (k < 0).any() or (k > 255).any() or off > 1e-3:
        raise ValueError(
            "float images must be 8-bit levels scaled as k / 127.5 - 1 (k = 0..255); these are off that grid "
            f"by up to {off:.3g}: bits/dim of 256 levels means nothing for data that is not 8-bit"
        )
    return k.long()


def dequantize(levels: Tensor, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Uniform dequantisation to [-1, 1): x = (k + w) / 256 * 2 - 1 with w ~ U[0, 1), so level k
    fills its bin [k / 128 - 1, (k + 1) / 128 - 1) of width 2/256. (Bin centres sit within half a
    bin of difflab's training grid k / 127.5 - 1.)"""
    levels = torch.as_tensor(levels)
    w = torch.rand(levels.shape, generator=generator, dtype=dtype).to(levels.device)
    return (levels.to(dtype) + w) / 128.0 - 1.0


def dequantized_bits_per_dim(logp: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of 8-bit data from log p(x) (nats) of a density on [-1, 1]^D at dequantised x.

    The map y = (x + 1) * 128 takes [-1, 1) onto [0, 256), where level k owns the unit bin
    [k, k + 1); its Jacobian is 128 per dimension, so log p_y(y) = log p_x(x) - D log 128.
    P(k) = int_bin p_y, and by Jensen -log P(k) <= E_w[-log p_y(k + w)], w ~ U[0, 1)^D, so

        bpd = -(log p_x(x) - D log 128) / (D ln 2) = -log p_x(x) / (D ln 2) + 7

    is (in expectation over w) an upper bound on the discrete codelength. Check: a flat density
    on [-1, 1]^D has log p_x = -D log 2, giving 1 + 7 = 8 bits/dim, the uniform code for 256 levels.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be an integer >= 1, got {num_dims!r}")
    return -(logp - num_dims * LOG_BINS_PER_UNIT) / (num_dims * math.log(2.0))


def ode_bits_per_dim(
    denoiser,
    x: Tensor,
    *,
    cond: dict | None = None,
    sde: SDE | None = None,
    u_start: float | None = None,
    u_end: float = 1.0,
    repeats: int = 3,
    batch_size: int = 64,
    divergence: str = "hutchinson",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    generator: torch.Generator | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
) -> dict:
    """Bits/dim of 8-bit images `x` (uint8, or floats k / 127.5 - 1) under a denoiser's
    probability-flow ODE.

    `sde` defaults to `ScheduleSDE(denoiser.schedule)`, integrated from the schedule's first
    level u_start = 1 / T (t = 0, the least noise a network was trained on) to u_end; for
    another SDE, u_start defaults to Song et al.'s 1e-5. Each of `repeats` passes draws fresh
    dequantisation noise and a fresh Hutchinson probe from `generator` (the same generator, so
    one seed fixes everything). `cond` tensors with one row per image are sliced with the batches;
    `prior_logp` replaces the SDE's prior (see `ode_log_likelihood`). Put a network in eval mode
    first (dropout would make the ODE random). Each evaluation is one forward and one backward pass;
    prefer "rk45": near the data end the score is ~ eps / 0.006, and a few fixed RK4 steps blow up.

    Returns {"bpd": (N,) per example, averaged over repeats; "per_repeat": (repeats, N);
    "mean": float; "sem": standard error of the mean from the spread of the repeats' means (the
    estimator's own noise: probes and dequantisation; nan for one repeat); "sem_examples": the
    standard error over examples (sampling the data set); "nfe": network calls of all solves}.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    levels = to_levels(x)
    device = device_of(denoiser)
    if levels.ndim < 2 or levels.shape[0] < 1:
        raise ValueError(f"images must have shape (N >= 1, ...), got {tuple(levels.shape)}")
    N, D = levels.shape[0], levels[0].numel()
    if sde is None:
        sde = ScheduleSDE(denoiser.schedule)
    if u_start is None:
        u_start = 1.0 / denoiser.schedule.T if isinstance(sde, ScheduleSDE) else 1e-5
    per_repeat = torch.zeros(repeats, N, dtype=torch.float64)
    nfe = 0
    for r in range(repeats):
        for i in range(0, N, batch_size):
            batch = levels[i : i + batch_size]
            batch_cond = None
            if cond is not None:
                batch_cond = {
                    k: v[i : i + batch_size] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == N else v
                    for k, v in cond.items()
                }
            out = ode_log_likelihood(
                score_from_denoiser(denoiser, sde, batch_cond),
                sde,
                dequantize(batch, generator).to(device),
                u_start=u_start,
                u_end=u_end,
                divergence=divergence,
                solver=solver,
                rtol=rtol,
                atol=atol,
                steps=steps,
                generator=generator,
                prior_logp=prior_logp,
            )
            per_repeat[r, i : i + batch.shape[0]] = dequantized_bits_per_dim(out["logp"], D).cpu()
            nfe += out["nfe"]
    means = per_repeat.mean(1)
    bpd = per_repeat.mean(0)
    sem = float(means.std() / math.sqrt(repeats)) if repeats > 1 else math.nan
    sem_examples = float(bpd.std() / math.sqrt(N)) if N > 1 else math.nan
    return {
        "bpd": bpd,
        "per_repeat": per_repeat,
        "mean": float(bpd.mean()),
        "sem": sem,
        "sem_examples": sem_examples,
        "nfe": nfe,
    }
