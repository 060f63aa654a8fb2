"""Two-dimensional toy distributions: Gaussian mixtures (ring, grid), swiss roll, two moons.

Why: 2-D data can be plotted whole and, for the mixtures, its score and optimal denoiser are
known exactly, so samplers and training can be checked against ground truth. The mixture
parameters (``*_mixture_params``) are what ``difflab.mixture.GaussianMixture`` is built from,
and ``sample_mixture`` draws from exactly those parameters.

All coordinates are roughly of unit scale:
- ring: 8 components on a circle of radius 2 (first at angle 0), isotropic std 0.1.
- grid: 5x5 components at spacing 1 centred on the origin (-2..2), isotropic std 0.1.
- swiss_roll: t ~ U[1.5 pi, 4.5 pi], point t (cos t, sin t) / 7 plus N(0, noise^2) noise.
- moons: scikit-learn's two half circles shifted by (-0.5, -0.25) so the mean is 0, plus noise.
"""

import inspect
import math

import torch
from torch.utils.data import Dataset

from difflab.data.seeding import check_seed, derive_seed, split_code

KINDS = ("ring", "grid", "swiss_roll", "moons")
SWISS_ROLL_SCALE = 7.0
MOONS_SHIFT = (0.5, 0.25)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _isotropic(means: torch.Tensor, std: float) -> dict[str, torch.Tensor]:
    k = means.shape[0]
    return {
        "weights": torch.full((k,), 1.0 / k, dtype=means.dtype),
        "means": means,
        "covs": (std**2) * torch.eye(2, dtype=means.dtype).expand(k, 2, 2).clone(),
    }


def ring_mixture_params(
    num_components: int = 8, radius: float = 2.0, std: float = 0.1, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Equal-weight isotropic Gaussians on a circle: {"weights" (K,), "means" (K, 2),
    "covs" (K, 2, 2)}."""
    k = _check_count("num_components", num_components)
    radius = _check_positive("radius", radius)
    std = _check_positive("std", std)
    angles = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return _isotropic(means.to(dtype), std)


def grid_mixture_params(
    side: int = 5, spacing: float = 1.0, std: float = 0.1, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Equal-weight isotropic Gaussians on a side x side grid centred on the origin (row-major,
    x varying fastest); same dict layout as ``ring_mixture_params``."""
    side = _check_count("side", side)
    spacing = _check_positive("spacing", spacing)
    std = _check_positive("std", std)
    ticks = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
    means = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    return _isotropic(means.to(dtype), std)


def sample_mixture(
    params: dict[str, torch.Tensor],
    n: int,
    generator: torch.Generator | None = None,
    return_components: bool = False,
):
    """n samples (n, 2) from a Gaussian mixture dict; optionally also the component of each."""
    n = _check_count("n", n)
    weights, means, covs = params["weights"], params["means"], params["covs"]
    components = torch.multinomial(weights.double(), n, replacement=True, generator=generator)
    chol = torch.linalg.cholesky(covs.double())
    noise = torch.randn(n, 2, 1, generator=generator, dtype=torch.float64)
    points = means.double()[components] + (chol[components] @ noise).squeeze(-1)
    points = points.to(means.dtype)
    return (points, components) if return_components else points


def sample_ring(n: int, generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """n points (n, 2) from the ring mixture; options go to ``ring_mixture_params``."""
    return sample_mixture(ring_mixture_params(**options), n, generator)


def sample_grid(n: int, generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """n points (n, 2) from the grid mixture; options go to ``grid_mixture_params``."""
    return sample_mixture(grid_mixture_params(**options), n, generator)


def sample_swiss_roll(
    n: int, generator: torch.Generator | None = None, noise: float = 0.05
) -> torch.Tensor:
    """n points (n, 2) on the 2-D swiss roll spiral (see module docstring) plus noise."""
    n = _check_count("n", n)
    noise = _check_positive("noise", noise, allow_zero=True)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    points = torch.stack([t * t.cos(), t * t.sin()], dim=1) / SWISS_ROLL_SCALE
    points = points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(torch.float32)


def sample_moons(
    n: int, generator: torch.Generator | None = None, noise: float = 0.05
) -> torch.Tensor:
    """n points (n, 2) on two interleaved half circles (each picked with probability 1/2).

    Upper moon: (cos a, sin a); lower moon: (1 - cos a, 0.5 - sin a), a ~ U[0, pi]; both
    shifted by -MOONS_SHIFT, so circle centres are at (-0.5, -0.25) and (0.5, 0.25).
    """
    n = _check_count("n", n)
    noise = _check_positive("noise", noise, allow_zero=True)
    angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    lower = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    x = torch.where(lower, 1 - angle.cos(), angle.cos())
    y = torch.where(lower, 0.5 - angle.sin(), angle.sin())
    points = torch.stack([x - MOONS_SHIFT[0], y - MOONS_SHIFT[1]], dim=1)
    points = points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points.to(torch.float32)


SAMPLERS = {
    "ring": sample_ring,
    "grid": sample_grid,
    "swiss_roll": sample_swiss_roll,
    "moons": sample_moons,
}
MIXTURE_PARAMS = {"ring": ring_mixture_params, "grid": grid_mixture_params}


def sample_toy2d(
    kind: str, n: int, generator: torch.Generator | None = None, **options
) -> torch.Tensor:
    """n points (n, 2) float32 of a named toy distribution (see ``KINDS``)."""
    if kind not in SAMPLERS:
        raise ValueError(f"toy2d kind must be one of {KINDS}, got {kind!r}")
    return SAMPLERS[kind](n, generator, **options)


class Toy2DDataset(Dataset):
    """A fixed sample of n points, items ``{"x": (2,) float32}``.

    The sample depends only on (kind, options, seed, split): train and test are independent
    draws. ``points`` holds all of it (n, 2); ``mixture_params`` the exact mixture for "ring"
    and "grid" (None otherwise).
    """

    num_classes = None
    image_shape = (2,)

    def __init__(
        self, kind: str = "ring", split: str = "train", n: int = 10_000, seed: int = 0, **options
    ):
        if kind not in SAMPLERS:
            raise ValueError(f"toy2d kind must be one of {KINDS}, got {kind!r}")
        self._check_options(kind, options)
        generator = torch.Generator().manual_seed(derive_seed(check_seed(seed), split_code(split)))
        self.kind = kind
        self.split = split
        self.points = sample_toy2d(kind, n, generator, **options).to(torch.float32)
        self.mixture_params = MIXTURE_PARAMS[kind](**options) if kind in MIXTURE_PARAMS else None

    @staticmethod
    def _check_options(kind: str, options: dict) -> None:
        """Reject options that the kind's sampler does not take, listing those it does."""
        func = MIXTURE_PARAMS.get(kind, SAMPLERS[kind])
        allowed = [p for p in inspect.signature(func).parameters if p not in ("n", "generator")]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for toy2d kind {kind!r}; allowed: {allowed}"
            )

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.points[i].clone()}
