"""The Gaussian forward process and its closed forms, and the one home of the
eps / x0 / v / score conversions (`Prediction`).

With a = alpha_bar_t:  x_t = sqrt(a) x0 + sqrt(1 - a) eps,   v = sqrt(a) eps - sqrt(1 - a) x0,
score = -eps / sqrt(1 - a).
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.schedules import Schedule, broadcast, is_shared

PREDICTION_TYPES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned")


def check_prediction_type(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return kind


def check_variance_type(kind: str) -> str:
    if kind not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance type {kind!r}; allowed: {', '.join(VARIANCE_TYPES)}")
    return kind


def check_data(x0: Tensor, name: str = "x0") -> Tensor:
    """Reject what would silently poison training: non-float dtypes and NaN/inf values."""
    if not isinstance(x0, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64) scaled to "
            f"[-1, 1], got dtype {x0.dtype}; convert uint8 images with x / 127.5 - 1"
        )
    if not torch.isfinite(x0).all():
        raise ValueError(f"{name} contains NaN or inf values; only finite values are allowed")
    return x0


# ---------------------------------------------------------------- forward process
def q_mean_var(schedule: Schedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """q(x_t | x_0) = N(sqrt(a) x0, (1 - a) I): its mean and (broadcastable) variance."""
    ab = broadcast(schedule.alpha_bar_at(t), x0)
    return ab.sqrt() * x0, 1.0 - ab


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Draw x_t from q(x_t | x_0) with the given noise (the reparameterization trick)."""
    ab = broadcast(schedule.alpha_bar_at(t), x0)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps


def q_step(schedule: Schedule, x_prev: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """One Markov step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""
    beta = broadcast(schedule.betas.to(x_prev.device)[t], x_prev)
    return (1.0 - beta).sqrt() * x_prev + beta.sqrt() * eps


def posterior_mean_var(schedule: Schedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0): mean, variance beta tilde and its log (clipped at t = 0)."""
    dev = x_t.device
    c0 = broadcast(schedule.posterior_mean_coef_x0.to(dev)[t], x_t)
    ct = broadcast(schedule.posterior_mean_coef_xt.to(dev)[t], x_t)
    var = broadcast(schedule.posterior_variance.to(dev)[t], x_t)
    logvar = broadcast(schedule.posterior_log_variance_clipped.to(dev)[t], x_t)
    return c0 * x0 + ct * x_t, var, logvar


def model_log_variance(
    schedule: Schedule, t: Tensor, kind: str, like: Tensor, var_frac: Tensor | None = None
) -> Tensor:
    """log Sigma_theta(x_t, t) for fixed small (beta tilde), fixed large (beta) or learned
    variance, the last being exp(v log beta + (1 - v) log beta tilde) with v = `var_frac`."""
    check_variance_type(kind)
    dev = like.device
    small = broadcast(schedule.posterior_log_variance_clipped.to(dev)[t], like)
    if kind == "fixed_small":
        return small.expand_as(like)
    large = broadcast(torch.log(schedule.betas).to(dev)[t], like)
    if kind == "fixed_large":
        return broadcast(schedule.large_log_variance.to(dev)[t], like).expand_as(like)
    if var_frac is None:
        raise ValueError("variance type 'learned' needs the network's variance output (var_frac)")
    return var_frac * large + (1.0 - var_frac) * small


# ---------------------------------------------------------------- predictions
def _combine(x: Tensor, c_x: Tensor | float, y: Tensor, c_y: Tensor | float) -> Tensor:
    """c_x x + c_y y with per-example (or scalar) coefficients: two passes over the data and
    one new tensor, where the textbook expression takes three or four of each."""
    return (x * broadcast(c_x, x)).addcmul_(y, broadcast(c_y, y))


class Prediction:
    """What a denoiser says about x_t: the clean data x0 and the noise eps (consistent with
    each other given x_t), plus the learned-variance interpolation `var_frac` in [0, 1].

    Made from a network output (`from_output`), x0 and eps are both linear in (x_t, output)
    and each is computed only when first read; `combine` gives c_x0 x0 + c_eps eps straight
    from (x_t, output) in two passes, which is all a DDIM step needs."""

    def __init__(self, x0: Tensor | None, eps: Tensor | None, var_frac: Tensor | None = None):
        self._x0, self._eps, self.var_frac = x0, eps, var_frac
        self._linear = None  # (x_t, output, (a_x0, b_x0), (a_eps, b_eps), their versions) if from an output

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            x_t, out, (a, b), _ = self._sources()
            self._x0 = _combine(x_t, a, out, b)
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            x_t, out, _, (a, b) = self._sources()
            self._eps = _combine(x_t, a, out, b)
        return self._eps

    def combine(self, c_x0: float | Tensor, c_eps: float | Tensor) -> Tensor:
        """c_x0 x0 + c_eps eps as a new tensor (coefficients scalar or per example)."""
        if self._linear is None or (self._x0 is not None and self._eps is not None):
            return _combine(self.x0, c_x0, self.eps, c_eps)
        x_t, out, (a0, b0), (a1, b1) = self._sources()
        return _combine(x_t, c_x0 * a0 + c_eps * a1, out, c_x0 * b0 + c_eps * b1)

    def _sources(self) -> tuple:
        """(x_t, output, x0 coefficients, eps coefficients), refused if x_t or the output was
        changed in place since (a lazily read x0 would silently be of another x_t)."""
        *linear, versions = self._linear
        if (linear[0]._version, linear[1]._version) != versions:
            raise RuntimeError("x_t or the network output was modified in place before the prediction was read")
        return tuple(linear)

    def __repr__(self) -> str:
        return f"Prediction(x0={self.x0!r}, eps={self.eps!r}, var_frac={self.var_frac!r})"

    @classmethod
    def from_output(cls, kind: str, output: Tensor, x_t: Tensor, alpha_bar: Tensor, var_frac=None) -> Prediction:
        """Interpret a network output of parameterisation `kind` ('eps', 'x0' or 'v')."""
        check_prediction_type(kind)
        # coefficients on the (B,) levels (once, where the batch shares one), in their own
        # (float64) precision: x0 = a_x0 x_t + b_x0 output, eps = a_eps x_t + b_eps output
        a = torch.as_tensor(alpha_bar, device=x_t.device)
        a = a[:1] if is_shared(a) else a
        s_a, s_1a = a.sqrt(), (1.0 - a).sqrt()
        if kind == "eps":  # x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
            pred, coefs = cls(None, output, var_frac), ((1.0 / s_a, -s_1a / s_a), (0.0, 1.0))
        elif kind == "x0":  # eps = (x_t - sqrt(a) x0) / sqrt(1-a)
            pred, coefs = cls(output, None, var_frac), ((0.0, 1.0), (1.0 / s_1a, -s_a / s_1a))
        else:  # v: x0 = sqrt(a) x_t - sqrt(1-a) v,  eps = sqrt(1-a) x_t + sqrt(a) v
            pred, coefs = cls(None, None, var_frac), ((s_a, -s_1a), (s_1a, s_a))
        pred._linear = (x_t, output, *coefs, (x_t._version, output._version))
        return pred

    @classmethod
    def from_x0(cls, x0: Tensor, x_t: Tensor, alpha_bar: Tensor) -> Prediction:
        return cls.from_output("x0", x0, x_t, alpha_bar)

    @classmethod
    def from_score(cls, score: Tensor, x_t: Tensor, alpha_bar: Tensor) -> Prediction:
        eps = -broadcast((1.0 - alpha_bar).sqrt(), x_t) * score
        return cls.from_output("eps", eps, x_t, alpha_bar)

    def v(self, alpha_bar: Tensor) -> Tensor:
        a = broadcast(alpha_bar, self.x0)
        return a.sqrt() * self.eps - (1.0 - a).sqrt() * self.x0

    def score(self, alpha_bar: Tensor) -> Tensor:
        """grad_x log q(x_t) = -eps / sqrt(1 - alpha_bar)."""
        return -self.eps / broadcast((1.0 - alpha_bar).sqrt(), self.eps)

    def target(self, kind: str, alpha_bar: Tensor) -> Tensor:
        """The prediction in parameterisation `kind`, e.g. to compare with a training target."""
        check_prediction_type(kind)
        return {"eps": lambda: self.eps, "x0": lambda: self.x0, "v": lambda: self.v(alpha_bar)}[kind]()
