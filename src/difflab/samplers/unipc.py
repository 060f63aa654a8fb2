"""UniPC (Zhao et al. 2023): a multistep predictor (UniP-p) whose every step is refined by a
corrector (UniC-p) that reuses the network evaluation the next step needs anyway, so the
corrector raises the order by one at no extra NFE. Data prediction, B(h) = e^-h - 1 ("bh2",
the authors' choice for few steps), in VE coordinates with lambda = -log sigma.

A step from level s (index i) to level t, h = lambda_t - lambda_s, is DDIM's plus a weighted
sum of scaled differences of x0_hat:
    x_t = e^-h x_s + (1 - e^-h) (m_s + sum_k rho_k D_k),   D_k = (m_k - m_s) / r_k,
r_k = (lambda_k - lambda_s) / h for earlier levels k (negative) and r = 1 for the corrector's
own new evaluation m_t. The rho solve the order conditions R rho = b of Zhao et al. (UniP-p
and UniC-p, the B(h) variant): R_jk = r_k^(j-1), b_j = j! phi_{j+1}(-h) / B(h), with the phi
functions of the exponential integrator; UniP-2 (rho = 1/2) is DPM-Solver++(2M) and UniC-1 takes rho = 1/2.
Every coefficient is a python float computed once per call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.samplers.loop import Callback, Generators
from difflab.samplers.ode import VELevels, make_loop

MAX_ORDER = 3


def order_conditions(h: float, p: int) -> list[float]:
    """b_1..b_p of a step of length h (bh2): b_j = j! h_phi_j / B(h) with hh = -h,
    h_phi_1 = e^hh - 1 = B(h), h_phi_{j+1} = h_phi_j / hh - 1 / (j + 1)! (Zhao et al. 2023)."""
    hh = -h
    b_h = math.expm1(hh)
    phi = b_h / hh - 1.0
    b, fact = [], 1.0
    for j in range(1, p + 1):
        b.append(phi * fact / b_h)
        fact *= j + 1
        phi = phi / hh - 1.0 / fact
    return b


def solve_small(R: list[list[float]], b: list[float]) -> list[float]:
    """R x = b for a tiny dense system (Gaussian elimination with partial pivoting)."""
    n = len(b)
    a = [row[:] + [b[i]] for i, row in enumerate(R)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def unipc_rhos(rks: list[float], h: float, corrector: bool) -> list[float]:
    """The weights rho of the differences D_k, given all p ratios r_k (the last is always 1:
    the new level). The predictor (UniP-p) weighs the p - 1 earlier levels by the first p - 1
    conditions; the corrector (UniC-p) weighs all p by all p. UniP-2 and UniC-1 take the
    simplified rho = 1/2, as the authors do."""
    p = len(rks)
    if (corrector and p == 1) or (not corrector and p == 2):
        return [0.5]
    m = p if corrector else p - 1
    if m == 0:
        return []
    R = [[r ** (j - 1) for r in rks[:m]] for j in range(1, m + 1)]
    return solve_small(R, order_conditions(h, m))


def step_coefficients(lv: VELevels, s: int, history: list[int], corrector: bool) -> tuple[float, dict[int, float]]:
    """(c_x, {level index: weight of its x0_hat}) of the step from level s to s + 1, using the
    x0_hat of the earlier levels `history` (nearest first) and, for the corrector, of s + 1."""
    h = lv.h(s)
    if math.isinf(h):  # onto sigma = 0: first order lands on x0_hat exactly
        return 0.0, {s: 1.0}
    used = [*history, s + 1] if corrector else history
    rks = [(lv.lam[k] - lv.lam[s]) / h for k in history] + [1.0]
    rhos = unipc_rhos(rks, h, corrector)
    c = -math.expm1(-h)  # 1 - e^-h
    weights = {s: c}
    for k, r, rho in zip(used, rks, rhos):  # c rho D_k = c rho (m_k - m_s) / r_k
        weights[k] = c * rho / r
        weights[s] -= c * rho / r
    return math.exp(-h), weights


def check_order(order: int) -> int:
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an integer in [1, {MAX_ORDER}], got {order!r}")
    return order


@torch.no_grad()
def unipc(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    progress: bool = True,
    order: int = 2,
    corrector: bool = True,
) -> Tensor:
    """UniPC-p (bh2): UniP-p predictor steps, each corrected by UniC-p once the network has been
    evaluated at the predicted point (the corrected state is the base of the next step, the
    evaluation at the uncorrected one is reused), so n timesteps cost n NFE. The order warms up
    (1, 2, ..) and comes down at the end (lower_order_final); the step to sigma = 0 is first
    order and lands on x0_hat. order=1 without corrector is DDIM, order=2 without it is
    DPM-Solver++(2M)."""
    order = check_order(order)
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got {corrector!r}")
    loop, lv = make_loop(denoiser, x_T, timesteps, generator, callback, cond, progress, "unipc")
    n = len(loop)
    p = [min(order, i + 1, n - i) for i in range(n)]
    predict = [step_coefficients(lv, i, list(range(i - 1, i - p[i], -1)), False) for i in range(n)]
    # the corrector of level i redoes the step that produced it (from i - 1, with its order)
    correct = [None] * n
    for i in range(1, n - 1) if corrector else ():
        correct[i] = step_coefficients(lv, i - 1, list(range(i - 2, i - 1 - p[i - 1], -1)), True)
    x = x_last = lv.ve(x_T, 0)
    x0s: dict[int, Tensor] = {}
    for i in loop:
        pred = loop.denoise(lv.vp(x, i), i)
        x0s[i] = pred.x0
        x0s.pop(i - order - 1, None)  # the corrector of level i reaches back to i - order
        if correct[i] is not None:
            x = combine(x_last, *correct[i], x0s)
        x_last = x
        x = pred.x0 if i == n - 1 else combine(x, *predict[i], x0s)
        loop.report(i, x, pred, scale=lv.to_vp[i + 1])
    return x


def combine(x: Tensor, c_x: float, weights: dict[int, float], x0s: dict[int, Tensor]) -> Tensor:
    """c_x x + sum_k weights[k] x0s[k], as one new tensor updated in place."""
    out = x * c_x
    for k, w in weights.items():
        if w != 0.0:
            out.add_(x0s[k], alpha=w)
    return out
