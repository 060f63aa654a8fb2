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
        # a half-precision network runs in its dtype; the sampler's arithmetic stays in x_t's
        net_dtype = network_dtype(self.net)
        out = self.net(x_t.to(net_dtype), t.to(torch.float32), cond).to(x_t.dtype)
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


def network_dtype(net: nn.Module) -> torch.dtype:
    """The dtype of a network's (first floating) parameters; float32 for parameter-free ones."""
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# Denoiser factories keyed by the parameterisation a network was trained with: eps, x0 and v
# all go through `Prediction.from_output`; a method with its own output scaling (e.g. the
# boundary-conditioned parameterisation of consistency models) registers its factory here.
DENOISER_FACTORIES: dict[str, type[Denoiser]] = {"eps": NetworkDenoiser, "x0": NetworkDenoiser, "v": NetworkDenoiser}


# parameterisations whose factory lives with its method: imported (and so registered) on first use
FACTORY_MODULES = {"consistency": "difflab.methods.consistency"}


def parameterizations() -> tuple[str, ...]:
    return (*DENOISER_FACTORIES, *(k for k in FACTORY_MODULES if k not in DENOISER_FACTORIES))


def build_denoiser(
    net: nn.Module,
    schedule: Schedule,
    prediction: str = "eps",
    variance: str = "fixed_small",
    sample_shape: tuple[int, ...] | None = None,
    **options,
) -> Denoiser:
    """The denoiser of `net` for its parameterisation (a key of `DENOISER_FACTORIES`)."""
    if prediction not in DENOISER_FACTORIES and prediction in FACTORY_MODULES:
        import importlib

        importlib.import_module(FACTORY_MODULES[prediction])
    if prediction not in DENOISER_FACTORIES:
        raise ValueError(f"unknown parameterisation {prediction!r}; allowed: {', '.join(parameterizations())}")
    return DENOISER_FACTORIES[prediction](net, schedule, prediction, variance, sample_shape, **options)


def network_of(denoiser: Denoiser) -> nn.Module | None:
    """The network under a denoiser's wrappers (guidance, thresholding); None for network-free ones."""
    while isinstance(denoiser, DenoiserWrapper):
        denoiser = denoiser.inner
    net = getattr(denoiser, "net", None)
    return net if isinstance(net, nn.Module) else None


def device_of(denoiser: Denoiser) -> torch.device:
    """Where a denoiser's network lives (through any wrappers); CPU for network-free ones, so
    conditions built for it (labels, encoded prompts) can be put on the same device."""
    net = network_of(denoiser)
    if net is not None:
        for p in net.parameters():
            return p.device
    return torch.device("cpu")


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


class DenoiserWrapper(Denoiser):
    """A denoiser built on another: forwards `schedule`, `prediction`, `variance` and
    `sample_shape`, and by default its predictions. Thresholding (and guidance) subclass it
    and override `predict`, so wrappers compose: Clip(DynamicThreshold(net))."""

    def __init__(self, inner: Denoiser):
        if not isinstance(inner, Denoiser):
            raise ValueError(f"a wrapper needs a Denoiser to wrap, got {type(inner).__name__}")
        self.inner = inner

    @property
    def schedule(self) -> Schedule:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def variance(self) -> str:
        return self.inner.variance

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        return self.inner.sample_shape

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        return self.inner.predict(x_t, t, cond)


class X0Thresholding(DenoiserWrapper):
    """Base of the x0 thresholders: changes x0_hat and recomputes eps from x_t and the new x0,
    so the Prediction stays consistent (x_t = sqrt(ab) x0 + sqrt(1 - ab) eps) and every
    sampler, whether it reads x0 or eps, sees the same thresholded prediction."""

    def threshold(self, x0: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, x_t: Tensor, t: Tensor, cond: dict | None) -> Prediction:
        pred = self.inner.predict(x_t, t, cond)
        alpha_bar = self.schedule.alpha_bar_at(t).to(x_t.device)
        new = Prediction.from_x0(self.threshold(pred.x0), x_t, alpha_bar)
        new.var_frac = pred.var_frac
        return new


# Static bound of a latent model's x0_hat: its latents are scaled to unit variance, so +-3
# keeps 99.7% of a Gaussian's mass while stopping the blow-up at the noisiest steps.
LATENT_CLIP_LIMIT = 3.0
DEFAULT_PERCENTILE = 0.995  # Imagen's dynamic thresholding percentile


class ClipDenoiser(X0Thresholding):
    """Static thresholding: x0_hat clipped to [-limit, limit] (data scaled to [-1, 1])."""

    def __init__(self, inner: Denoiser, limit: float = 1.0):
        super().__init__(inner)
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not 0 < limit < float("inf"):
            raise ValueError(f"limit must be a finite number > 0, got {limit!r}")
        self.limit = float(limit)

    def threshold(self, x0: Tensor) -> Tensor:
        return x0.clamp(-self.limit, self.limit)


class DynamicThresholdDenoiser(X0Thresholding):
    """Imagen's dynamic thresholding (Saharia et al. 2022): per example, s = max(1, the
    `percentile` quantile of |x0_hat|), then x0_hat = clip(x0_hat, -s, s) / s. Saturated
    pixels are pushed inwards instead of piling up at +-1, which matters with strong guidance."""

    def __init__(self, inner: Denoiser, percentile: float = DEFAULT_PERCENTILE):
        super().__init__(inner)
        if not isinstance(percentile, (int, float)) or isinstance(percentile, bool) or not 0 < percentile <= 1:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile!r}")
        self.percentile = float(percentile)

    def threshold(self, x0: Tensor) -> Tensor:
        flat = x0.flatten(1).abs()
        if flat.dtype in (torch.float16, torch.bfloat16):  # quantile needs float32/64
            flat = flat.float()
        q = torch.quantile(flat, self.percentile, dim=1)
        s = q.clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s


THRESHOLDINGS = ("none", "static", "dynamic")


def thresholded(denoiser: Denoiser, kind: str, limit: float = 1.0, percentile: float = DEFAULT_PERCENTILE) -> Denoiser:
    """`denoiser` with x0 thresholding of the named kind ("none" returns it unchanged).
    Pixel models should sample with "static" (improved-diffusion's clip_denoised): without it,
    eps-prediction at the noisiest steps divides model error by sqrt(alpha_bar) ~ 1e-4.
    `limit` is the static bound (1 for pixels; unit-variance latents use LATENT_CLIP_LIMIT);
    `percentile` the quantile of |x0_hat| that dynamic thresholding scales by."""
    if kind not in THRESHOLDINGS:
        raise ValueError(f"unknown thresholding {kind!r}; allowed: {', '.join(THRESHOLDINGS)}")
    if kind == "static":
        return ClipDenoiser(denoiser, limit)
    if kind == "dynamic":
        return DynamicThresholdDenoiser(denoiser, percentile)
    return denoiser
