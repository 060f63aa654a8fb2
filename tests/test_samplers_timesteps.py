"""Timestep spacings and improved-diffusion respacing strings."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.samplers import SPACINGS, get_timesteps, space_timesteps
from difflab.schedules import Schedule, karras_sigmas
from test_samplers_support import (
    SCHEDULES,
)

S1000 = SCHEDULES[1000]


def test_known_values_for_T_1000():
    def ts(n, spacing):
        return get_timesteps(S1000, n, spacing).tolist()

    assert ts(10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ts(10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ts(10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    # diffusers #9261's 13-step trailing example
    assert ts(13, "trailing") == [999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 7, 13, 50, 999, 1000])
def test_every_spacing_is_strictly_descending_with_n_steps(spacing, n):
    ts = get_timesteps(S1000, n, spacing)
    assert ts.numel() == n and ts.ndim == 1
    assert (ts.diff() < 0).all()
    assert ts.min() >= 0 and ts.max() <= 999
    # the first step is the noisiest kept step; linspace/trailing/sigma ladders start at T-1
    assert ts[0] == ts.max()
    if spacing != "leading":
        assert ts[0] == 999
    if spacing in ("linspace", "karras", "geometric") and n > 1:
        assert ts[-1] == 0


def test_leading_starts_below_T_minus_1_as_documented():
    """'leading' (diffusers', steps_offset 0) anchors the stride at t = 0: with 7 of 1000 steps
    the noisiest kept step is 6 * 142 = 852, not 999."""
    assert get_timesteps(S1000, 7, "leading").tolist() == [852, 710, 568, 426, 284, 142, 0]


@pytest.mark.parametrize("spacing,rho", [("karras", 7.0), ("karras", 3.0), ("geometric", None)])
def test_sigma_spacings_follow_their_ladder(spacing, rho):
    n = 12
    ts = get_timesteps(S1000, n, spacing, rho=rho or 7.0)
    assert ts.dtype == torch.float64
    lo, hi = S1000.sigmas[0].item(), S1000.sigmas[-1].item()
    if spacing == "karras":
        ladder = karras_sigmas(lo, hi, n, rho).flip(0)
    else:
        ladder = torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64))
    torch.testing.assert_close(S1000.sigma_at(ts), ladder, rtol=1e-9, atol=0)


def test_respacing_strings_match_improved_diffusion():
    # sections of 100 steps: 10 strided by 11, 15 by 99/14, 20 by 99/19 (rounded)
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert kept[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert kept[10:25] == [100 + math.floor(j * 99 / 14 + 0.5) for j in range(15)]
    assert kept[25:] == [200 + math.floor(j * 99 / 19 + 0.5) for j in range(20)]
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))
    assert space_timesteps(10, "ddim1") == [0]
    # uneven sections: the first T % k sections get one step more
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]
    schedule = Schedule.make("linear", T=300)
    assert get_timesteps(schedule, None, "10,15,20").tolist() == sorted(kept, reverse=True)
    assert get_timesteps(schedule, 45, "10,15,20").numel() == 45


def test_respaced_betas_reproduce_alpha_bar_at_kept_steps():
    for spacing in ("linspace", "trailing", "leading", "ddim20", "5,10,3"):
        ts = get_timesteps(S1000, 18 if spacing in SPACINGS else None, spacing)
        respaced = S1000.respace(ts)
        kept = ts.flip(0)
        torch.testing.assert_close(respaced.alpha_bar, S1000.alpha_bar[kept], rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.cumprod(1 - respaced.betas, 0), S1000.alpha_bar[kept], rtol=1e-12, atol=0)
        assert respaced.alpha_bar_prev[0] == 1.0
        assert respaced.timesteps.tolist() == kept.tolist()


def test_bad_spacings_and_counts_are_rejected():
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        get_timesteps(S1000, 0, "linspace")
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        get_timesteps(S1000, 1001, "trailing")
    with pytest.raises(ValueError, match="unknown spacing 'cosine'; allowed: linspace, trailing, leading"):
        get_timesteps(S1000, 10, "cosine")
    with pytest.raises(ValueError, match="no integer stride gives exactly 6 steps"):
        space_timesteps(10, "ddim6")
    with pytest.raises(ValueError, match="'ddimS' needs a positive integer"):
        space_timesteps(10, "ddimx")
    with pytest.raises(ValueError, match=r"section 1 of '3,5' has 4 steps; its count must lie in \[1, 4\]"):
        space_timesteps(8, "3,5")
    with pytest.raises(ValueError, match="keeps 25 steps but steps=10"):
        get_timesteps(S1000, 10, "ddim25")
    with pytest.raises(ValueError, match="rho must be > 0"):
        get_timesteps(S1000, 10, "karras", rho=0.0)
    ztsnr = Schedule.make("linear", T=100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        get_timesteps(ztsnr, 10, "karras")
