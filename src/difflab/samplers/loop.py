"""What every sampler loop shares: timestep checks, per-step denoiser calls, noise, progress
and the per-step callback. Samplers are plain functions that build one `SamplerLoop` per
call, so nothing survives between calls (diffusers #8711).

Everything per step is precomputed once per call (timestep tensors here, coefficients as
python floats in the samplers), so the loop itself costs a handful of tensor ops per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.process import Prediction

Generators = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, float, Tensor, Prediction], None]


def randn(shape: Sequence[int], generator: Generators = None, *, dtype=None, device=None) -> Tensor:
    """Standard normal noise. With a list of generators, example b is drawn from generator[b],
    so an example's noise does not depend on the batch it is drawn in (k-diffusion #25)."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)
    gens = check_generator(generator, shape[0])
    rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device) for g in gens]
    return torch.stack(rows).to(device)


def check_generator(generator: Generators, batch: int) -> Generators:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(
            f"generator must be None, a torch.Generator or a list of {batch} torch.Generators "
            f"(one per batch element), got {type(generator).__name__} of length {len(gens)}"
        )
    return gens


def check_timesteps(timesteps: Tensor | Sequence[float], T: int) -> Tensor:
    """A non-empty, strictly descending 1-D list of (possibly fractional) indices in [0, T-1]."""
    ts = torch.as_tensor(timesteps)
    if not ts.is_floating_point():
        ts = ts.long()
    else:
        ts = ts.to(torch.float64)
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if (ts < 0).any() or (ts > T - 1).any():
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.tolist()}")
    if (ts.diff() >= 0).any():
        raise ValueError(f"timesteps must be strictly descending (noisiest first), got {ts.tolist()}")
    return ts.cpu()


class SamplerLoop:
    """One sampling run: `for i in loop: pred = loop.denoise(x, i) ... loop.report(i, x, pred)`."""

    def __init__(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        timesteps: Tensor | Sequence[float],
        *,
        generator: Generators = None,
        callback: Callback | None = None,
        cond: dict | None = None,
        progress: bool = True,
        desc: str = "sampling",
    ):
        denoiser.check_shape(x_T.shape)
        self.denoiser, self.cond, self.callback = denoiser, cond, callback
        self.generator = check_generator(generator, x_T.shape[0])
        self.timesteps = check_timesteps(timesteps, denoiser.schedule.T)
        self.t = self.timesteps.tolist()
        self.alpha_bar = denoiser.schedule.alpha_bar_at(self.timesteps).tolist()
        on_device = self.timesteps.to(x_T.device)
        self._t_batch = [on_device[i].expand(x_T.shape[0]) for i in range(len(self.t))]
        self.progress, self.desc = progress, desc

    def __len__(self) -> int:
        return len(self.t)

    def __iter__(self):
        if not self.progress:
            return iter(range(len(self.t)))
        from tqdm.auto import trange

        return iter(trange(len(self.t), desc=self.desc, leave=False))

    @property
    def is_integer(self) -> bool:
        return not self.timesteps.is_floating_point()

    def t_batch(self, i: int) -> Tensor:
        """The i-th listed timestep for every example, (B,) on x_T's device."""
        return self._t_batch[i]

    def denoise(self, x: Tensor, i: int) -> Prediction:
        """The denoiser at the i-th listed timestep (x in VP coordinates)."""
        return self.denoiser(x, self._t_batch[i], self.cond)

    def noise(self, like: Tensor) -> Tensor:
        return randn(like.shape, self.generator, dtype=like.dtype, device=like.device)

    def report(self, i: int, x: Tensor, pred: Prediction, *, scale: float = 1.0, t: float | None = None) -> None:
        """callback(step_index, t, x * scale, prediction) after step i, t being the timestep the
        prediction was made at (default: the i-th listed). `scale` maps a sampler's working
        coordinates to VP ones, paid for only when someone listens."""
        if self.callback is not None:
            self.callback(i, self.t[i] if t is None else t, x * scale if scale != 1.0 else x, pred)
