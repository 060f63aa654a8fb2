"""Denoisers: `(x_t, t, cond) -> Prediction`, whatever the network was trained to output.

Samplers, losses and guidance see only this interface. A denoiser carries its `schedule`
(so it can turn t into alpha_bar), its `variance` type (fixed_small, fixed_large or
learned), its `prediction` parameterisation and, where known, the `sample_shape` of one
example. Guidance and thresholding are denoisers that wrap denoisers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.mixture import GaussianMixture
from difflab.process import Prediction, check_prediction_type, check_variance_type
from difflab.schedules import Schedule


def as_timesteps(t: Tensor | float | int, batch: int, device: torch.device | None = None) -> Tensor:
    """t as a (batch,) tensor: scalars and 0-dim tensors are broadcast."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


class Denoiser:
    """Base class: subclasses implement `predict(x_t, t, cond)` for a (B,) tensor t."""

    schedule: Schedule
    prediction: str = "x0"
    variance: str = "fixed_small"
    sample_shape: tuple[int, ...] | None = None

    def __call__(self, x_t: Tensor, t: Tensor | float | int, cond: dict | None = None) -> Prediction:
        return self.predict(x_t, as_timesteps(t, x_t.shape[0], x_t.device), cond)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Samplers call this so a wrong shape fails before any work, not deep in a network."""
        shape = tuple(shape)
        if len(shape) < 2 or shape[0] < 1:
            raise ValueError(f"shape must be (batch, ...) with batch >= 1, got {shape}")
        if self.sample_shape is not None and shape[1:] != tuple(self.sample_shape):
            raise ValueError(
                f"shape {shape} does not match the denoiser: expected (batch, {', '.join(map(str, self.sample_shape))})"
            )


class NetworkDenoiser(Denoiser):
    """Wraps a network trained to output eps, x0 or v (plus, with learned variance, a second
    half of channels holding v in [-1, 1], mapped to the interpolation fraction (v + 1) / 2)."""

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "eps",
        variance: str = "fixed_small",
        sample_shape: tuple[int, ...] | None = None,
    ):
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction_type(prediction)
        self.variance = check_variance_type(variance)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        out = self.net(x_t, t.to(torch.float32), cond)
        var_frac = None
        if self.variance == "learned":
            if out.shape[1] != 2 * x_t.shape[1]:
                raise ValueError(
                    f"learned variance needs a network with 2x{x_t.shape[1]} output channels, got {out.shape[1]}"
                )
            out, v = out.chunk(2, dim=1)
            var_frac = (v + 1.0) / 2.0
        alpha_bar = self.schedule.alpha_bar_at(t).to(x_t.device)
        return Prediction.from_output(self.prediction, out, x_t, alpha_bar, var_frac=var_frac)


class MixtureDenoiser(Denoiser):
    """The exact denoiser E[x0 | x_t] of a Gaussian-mixture data distribution: the oracle
    that tests and benchmarks use to check samplers without training anything."""

    prediction = "x0"

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, sample_shape: tuple[int, ...] | None = None):
        self.mixture = mixture
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (mixture.D,)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        alpha_bar = self.schedule.alpha_bar_at(t).to(x_t.device)
        x0 = self.mixture.posterior_mean(x_t, alpha_bar)
        return Prediction.from_x0(x0, x_t, alpha_bar)
