"""Noise schedules: one `Schedule` object that samplers, losses and networks all share.

Time convention (used everywhere in difflab): a timestep is the *index* t in [0, T-1] of
the discrete chain, so t = 0 is the first noising step (the papers' t = 1). Fractional t
interpolates between grid points, and t = -1 stands for clean data (alpha_bar = 1); this
is how ODE solvers and continuous-time views query a discrete schedule. All coefficients
are float64.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

SCHEDULE_NAMES = ("linear", "cosine", "scaled_linear", "sigmoid", "vp", "subvp")
MAX_T = 100_000  # steps of a chain (or noise levels of a ladder): a sanity limit, far beyond any model's
# schedule config kinds: (required keys, optional keys)
_CONFIG_KINDS = {
    "named": (("name",), ("T", "zero_terminal_snr", "s", "max_beta", "beta_start", "beta_end", "start", "end",
                         "beta_min", "beta_max")),
    "betas": (("betas",), ("name",)),
    "sigmas": (("sigmas",), ("name",)),
    "ve": ((), ("sigma_min", "sigma_max", "n", "spacing", "rho")),
    "respaced": (("base", "timesteps"), ()),
}


def betas_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """The one place betas are derived from a cumulative product: beta_i = 1 - ab_i / ab_{i-1}."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1.0 - alpha_bar / prev


def _check_T(T: int) -> int:
    if not isinstance(T, int) or isinstance(T, bool) or not 1 <= T <= MAX_T:
        raise ValueError(f"T (number of diffusion steps) must be an integer >= 1 and <= {MAX_T}, got {T!r}")
    return T


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020. The endpoints are given for T = 1000 and rescaled for other T so the
    process still ends near pure noise (as improved-diffusion does); clipped at 0.999 for
    very short chains, where the rescaled end would pass 1."""
    scale = 1000 / _check_T(T)
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64).clamp(max=0.999)


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's f(t)/f(0) with f(t) = cos^2(((t + s) / (1 + s)) * pi / 2), t in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule: betas from the closed-form alpha_bar, clipped at `max_beta`."""
    grid = torch.arange(_check_T(T) + 1, dtype=torch.float64) / T
    # the first beta is relative to alpha_bar(0) = 1, which betas_from_alpha_bar assumes
    return betas_from_alpha_bar(cosine_alpha_bar(grid[1:], s)).clamp(max=max_beta)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, _check_T(T), dtype=torch.float64) ** 2


def sigmoid_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, start: float = -6.0, end: float = 6.0
) -> Tensor:
    """Betas following a sigmoid between beta_start and beta_end (as used for GeoDiff/RIN)."""
    x = torch.linspace(start, end, _check_T(T), dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def _sde_integral(u: Tensor, beta_min: float, beta_max: float) -> Tensor:
    """B(u) = int_0^u beta, for the score-SDE paper's linear beta(u) = beta_min + u (beta_max - beta_min)."""
    if not 0 < beta_min < beta_max < math.inf:
        raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
    return beta_min * u + 0.5 * u**2 * (beta_max - beta_min)


def vp_betas(T: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """Song et al. 2021's VP SDE (Eq. 11) read at u = (t + 1) / T: alpha_bar = e^{-B(u)} exactly,
    so a model trained on it is that SDE's score model at every grid point."""
    u = torch.arange(1, _check_T(T) + 1, dtype=torch.float64) / T
    return betas_from_alpha_bar(torch.exp(-_sde_integral(u, beta_min, beta_max)))


def subvp_betas(T: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """The sub-VP SDE (Eq. 12) as the VP schedule with the same noise levels: its marginal
    m x0 + s eps (m = e^{-B/2}, s = 1 - e^{-B}) divided by sqrt(m^2 + s^2) is a VP sample with
    alpha_bar = m^2 / (m^2 + s^2), so one network serves both (see `methods.sde.score_from_denoiser`)."""
    u = torch.arange(1, _check_T(T) + 1, dtype=torch.float64) / T
    integral = _sde_integral(u, beta_min, beta_max)
    m2, s = torch.exp(-integral), -torch.expm1(-integral)
    return betas_from_alpha_bar(m2 / (m2 + s**2))


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so the last step is pure noise
    (alpha_bar_T = 0) while the first step's sqrt(alpha_bar) is kept."""
    ab_sqrt = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    return betas_from_alpha_bar(ab_sqrt**2)


def geometric_sigmas(sigma_min: float = 0.01, sigma_max: float = 50.0, n: int = 10) -> Tensor:
    """NCSN's VE noise levels: a geometric sequence, increasing."""
    _check_sigmas(sigma_min, sigma_max, n)
    return torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), n, dtype=torch.float64))


def karras_sigmas(sigma_min: float = 0.002, sigma_max: float = 80.0, n: int = 40, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 spacing, increasing: (a + i/(n-1) (b - a))^rho with a, b = sigma^(1/rho)."""
    _check_sigmas(sigma_min, sigma_max, n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def _check_sigmas(sigma_min: float, sigma_max: float, n: int) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    _check_T(n)


class Schedule:
    """A variance-preserving discrete schedule of T steps, with its continuous and VE views.

    Build it from betas (`Schedule(betas)`), by name (`Schedule.make("cosine", T=1000)`), or
    from VE noise levels (`Schedule.from_sigmas(...)`: x_VP = x_VE / sqrt(1 + sigma^2), so a
    VE schedule is a VP schedule with alpha_bar = 1 / (1 + sigma^2)). `respace(timesteps)`
    makes the shorter chain that visits only the kept steps.
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        *,
        timesteps: Tensor | None = None,
        name: str = "custom",
        config: dict | None = None,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not 1 <= betas.numel() <= MAX_T:
            raise ValueError(f"a schedule needs T >= 1 betas and at most {MAX_T}, got {betas.numel()}")
        bad = ~((betas > 0) & (betas < 1))
        bad[-1] = ~((betas[-1] > 0) & (betas[-1] <= 1))  # beta_T = 1 is zero terminal SNR
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"betas must lie in (0, 1) (the last may be exactly 1 for zero terminal SNR); "
                f"beta[{i}] = {betas[i].item()!r}"
            )
        self.name = name
        # how to rebuild this schedule (`to_config`); raw betas when no recipe made it
        self._config = config if config is not None else {"kind": "betas", "betas": betas.tolist(), "name": name}
        self.betas = betas
        self.T = betas.numel()
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([betas.new_ones(1), self.alpha_bar[:-1]])
        # original-chain index of each step (identity unless respaced)
        self.timesteps = torch.arange(self.T) if timesteps is None else torch.as_tensor(timesteps).long()
        # posterior q(x_{t-1} | x_t, x_0): variance beta tilde and the mean's coefficients
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta tilde is 0 at t = 0: clip its log to the next value, as is standard
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if self.T > 1 else betas
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef_x0 = betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef_xt = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        # "fixed large" variance: beta_t, with beta tilde at t = 0 so the decoder stays sharp
        self.large_log_variance = torch.log(torch.cat([clipped[:1], betas[1:]]))
        # alpha_bar on the extended grid t = -1 (clean), 0, ..., T-1 for interpolation
        self._ab_grid = torch.cat([betas.new_ones(1), self.alpha_bar])

    # ---------------------------------------------------------------- construction
    @classmethod
    def make(cls, name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False, **kwargs) -> Schedule:
        """A named VP schedule; `kwargs` go to its maker (e.g. s for cosine, beta_start/beta_end)."""
        makers = {
            "linear": linear_betas,
            "cosine": cosine_betas,
            "scaled_linear": scaled_linear_betas,
            "sigmoid": sigmoid_betas,
            "vp": vp_betas,
            "subvp": subvp_betas,
        }
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be true or false, got {zero_terminal_snr!r}")
        allowed = [p for p in inspect.signature(makers[name]).parameters if p != "T"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"schedule {name!r} takes no option(s) {unknown}; it takes {', '.join(allowed)}")
        betas = makers[name](T, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        config = {"kind": "named", "name": name, "T": T, "zero_terminal_snr": zero_terminal_snr, **kwargs}
        return cls(betas, name=name + ("+ztsnr" if zero_terminal_snr else ""), config=config)

    @classmethod
    def from_sigmas(cls, sigmas: Tensor | Sequence[float], name: str = "ve") -> Schedule:
        """A VE noise ladder (increasing sigmas) as the equivalent VP schedule."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if sigmas.numel() < 1 or (sigmas <= 0).any() or (sigmas.diff() <= 0).any() or not sigmas.isfinite().all():
            raise ValueError("VE sigmas must be finite, positive and strictly increasing")
        config = {"kind": "sigmas", "sigmas": sigmas.tolist(), "name": name}
        return cls(betas_from_alpha_bar(1.0 / (1.0 + sigmas**2)), name=name, config=config)

    @classmethod
    def ve(
        cls,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        n: int = 1000,
        spacing: str = "geometric",
        rho: float = 7.0,
    ) -> Schedule:
        """A VE ladder of `n` levels: NCSN's geometric one or Karras et al.'s (`rho`)."""
        if spacing == "geometric":
            sigmas = geometric_sigmas(sigma_min, sigma_max, n)
        elif spacing == "karras":
            sigmas = karras_sigmas(sigma_min, sigma_max, n, rho)
        else:
            raise ValueError(f"VE spacing must be 'geometric' or 'karras', got {spacing!r}")
        schedule = cls.from_sigmas(sigmas, name=f"ve-{spacing}")
        schedule._config = {"kind": "ve", "sigma_min": sigma_min, "sigma_max": sigma_max, "n": n, "spacing": spacing}
        if spacing == "karras":
            schedule._config["rho"] = rho
        return schedule

    def respace(self, timesteps: Sequence[int] | Tensor) -> Schedule:
        """The chain that jumps between the kept steps (indices into *this* schedule)."""
        ts = torch.as_tensor(timesteps).long().flatten()
        if ts.numel() < 1 or ts.min() < 0 or ts.max() >= self.T:
            raise ValueError(f"respaced timesteps must be non-empty indices in [0, {self.T - 1}], got {ts.tolist()}")
        ts = ts.unique(sorted=True)
        return Schedule(
            betas_from_alpha_bar(self.alpha_bar[ts]),
            timesteps=self.timesteps[ts],
            name=f"{self.name}[{ts.numel()}]",
            config={"kind": "respaced", "base": self.to_config(), "timesteps": ts.tolist()},
        )

    # ---------------------------------------------------------------- config round trip
    def to_config(self) -> dict:
        """A JSON-ready dict from which `Schedule.from_config` rebuilds this schedule exactly."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: dict) -> Schedule:
        """Inverse of `to_config`. Kinds: named (make's arguments), betas, sigmas (a VE ladder),
        ve (make a geometric or Karras ladder), respaced (a base config + kept indices)."""
        if not isinstance(config, dict) or "kind" not in config:
            kinds = ", ".join(_CONFIG_KINDS)
            raise ValueError(f"a schedule config must be a dict with a 'kind' ({kinds}), got {config!r}")
        kind, args = config["kind"], {k: v for k, v in config.items() if k != "kind"}
        if kind not in _CONFIG_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; allowed: {', '.join(_CONFIG_KINDS)}")
        required, optional = _CONFIG_KINDS[kind]
        missing, unknown = set(required) - set(args), set(args) - set(required) - set(optional)
        if missing or unknown:
            raise ValueError(
                f"schedule config of kind {kind!r}: missing {sorted(missing)}, unknown {sorted(unknown)}; it takes "
                f"{', '.join(required)}" + (f" and optionally {', '.join(optional)}" if optional else "")
            )
        if kind == "named":
            return cls.make(**args)
        if kind == "betas":
            return cls(args["betas"], name=args.get("name", "custom"))
        if kind == "sigmas":
            return cls.from_sigmas(args["sigmas"], name=args.get("name", "ve"))
        if kind == "ve":
            return cls.ve(**args)
        return cls.from_config(args["base"]).respace(args["timesteps"])

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, T={self.T})"

    # ---------------------------------------------------------------- discrete / continuous views
    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        """alpha_bar at integer or fractional index t in [-1, T-1] (float64).

        Integer t reads the table; fractional t interpolates alpha_bar linearly between grid
        points, which is monotone, exact at the grid and invertible by `sigma_to_t`.
        """
        t = torch.as_tensor(t)
        if is_shared(t):  # a sampler's one level for the whole batch: look it up once
            return self.alpha_bar_at(t[:1]).expand(t.shape[0])
        if not t.is_floating_point():
            if (t < -1).any() or (t > self.T - 1).any():
                raise ValueError(f"timestep index must lie in [-1, {self.T - 1}], got {t.tolist()}")
            return self._ab_grid.to(t.device)[t + 1]
        pos = t.to(torch.float64) + 1.0
        if (pos < -1e-9).any() or (pos > self.T + 1e-9).any():
            raise ValueError(f"timestep must lie in [-1, {self.T - 1}], got {t.tolist()}")
        pos = pos.clamp(0, self.T)
        lo = pos.floor().long().clamp(max=self.T - 1)
        frac = pos - lo
        grid = self._ab_grid.to(pos.device)
        return torch.lerp(grid[lo], grid[lo + 1], frac)  # exact at both ends of a segment

    def sigma_at(self, t: Tensor | float) -> Tensor:
        """VE noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (inf where alpha_bar = 0)."""
        ab = self.alpha_bar_at(t)
        return ((1.0 - ab) / ab).sqrt()

    def log_snr_at(self, t: Tensor | float) -> Tensor:
        ab = self.alpha_bar_at(t)
        return torch.log(ab) - torch.log1p(-ab)

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Inverse of `sigma_at`: the fractional index with that noise level."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        ab = 1.0 / (1.0 + sigma**2)
        grid = self._ab_grid.to(sigma.device)
        sigma_max = self.sigmas[-1].to(sigma.device)
        if (sigma > sigma_max * (1.0 + 1e-9)).any():  # relative: alpha_bar_T can be far below any absolute tolerance
            got = sigma.max().item()
            raise ValueError(f"sigma beyond the schedule's maximum {sigma_max.item():.4g}, got {got:.4g}")
        # grid is decreasing; find lo with grid[lo] >= ab >= grid[lo + 1]
        lo = (torch.searchsorted(-grid, -ab, right=True) - 1).clamp(0, self.T - 1)
        frac = (grid[lo] - ab) / (grid[lo] - grid[lo + 1])
        return lo.to(torch.float64) + frac.clamp(0, 1) - 1.0

    def continuous(self, u: Tensor | float) -> Tensor:
        """alpha_bar at continuous time u in [0, 1] (u = (t + 1) / T)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        if (u < 0).any() or (u > 1).any():
            raise ValueError(f"continuous time must lie in [0, 1], got {u.tolist()}")
        return self.alpha_bar_at(u * self.T - 1.0)

    @property
    def sigmas(self) -> Tensor:
        """VE noise levels at the grid, increasing (the last is inf for zero terminal SNR)."""
        return ((1.0 - self.alpha_bar) / self.alpha_bar).sqrt()

    @property
    def log_snr(self) -> Tensor:
        return torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)


def is_shared(levels: Tensor) -> bool:
    """Whether a (B,) tensor is one value expanded over the batch (stride 0, as samplers pass
    their timestep): per-example arithmetic on it can then be done once."""
    return levels.ndim == 1 and levels.shape[0] > 1 and levels.stride(0) == 0


def broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """Per-example coefficients (B,) or scalar, in `like`'s dtype, shaped to broadcast over it."""
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)  # a python float straight to like's dtype
    if coef.ndim == 0:
        return coef
    return coef.reshape(-1, *([1] * (like.ndim - 1)))
