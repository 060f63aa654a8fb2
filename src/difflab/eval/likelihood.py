"""Bits/dim of the test digits under a model, by its variational bound or exactly through its
probability-flow ODE, on the same 8-bit data.

The digits are 17-level images resized to the model's size, so they are not 8-bit: both
methods first re-quantise them to difflab's 8-bit grid k / 127.5 - 1 (k = 0..255). The bound
(`losses.nll_bits_per_dim`, improved DDPM's discretised decoder) then scores each level's bin of
width 2/255 around k / 127.5 - 1; the ODE (`methods.likelihood.ode_bits_per_dim`) scores the
uniform dequantisation of bins of width 2/256 on [-1, 1). The two codes differ by at most
log2(256/255) = 0.0056 bits/dim from the bin widths, well below the gaps being measured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LIKELIHOODS = ("vlb", "ode")


def requantize_8bit(images: Tensor) -> Tensor:
    """Images in [-1, 1] moved to the nearest 8-bit level k / 127.5 - 1."""
    k = ((images.double().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return (k / 127.5 - 1.0).to(images.dtype)


def eight_bit_test_digits(size: int, n: int | None = None) -> Tensor:
    """The first `n` (default all) test digits at `size`, re-quantised to 8 bits."""
    from difflab.data.digits import DigitsDataset

    images = DigitsDataset("test", size=size).images
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(images):
            raise ValueError(f"n must be an integer in [1, {len(images)}] (test digits), got {n!r}")
        images = images[:n]
    return requantize_8bit(images)


def bits_per_dim(
    denoiser, images: Tensor, method: str = "vlb", *, seed: int = 0, repeats: int = 3, batch_size: int = 64,
    cond: dict | None = None, progress: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
) -> dict:  # fmt: skip
    """{"method", "bits_per_dim", "sem" (over repeats; vlb: over the repeats' forward noise too),
    "per_repeat", "num_images", "seconds", "nfe"} of 8-bit `images` under `denoiser`."""
    import time

    from difflab.denoiser import network_of
    from difflab.eval.metrics import nll_bpd
    from difflab.methods.likelihood import ode_bits_per_dim

    if method not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood method {method!r}; allowed: {', '.join(LIKELIHOODS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    start = time.perf_counter()
    net = network_of(denoiser)
    was_training = net.training if net is not None else False
    if net is not None:
        net.eval()  # dropout would make both estimates random
    try:
        if method == "vlb":
            per_repeat = [nll_bpd(denoiser, images, batch_size, cond, seed + r, progress) for r in range(repeats)]
            nfe = repeats * denoiser.schedule.T * math.ceil(len(images) / batch_size)
        else:
            out = ode_bits_per_dim(denoiser, images, cond=cond, repeats=repeats, batch_size=batch_size, rtol=rtol,
                                   atol=atol, generator=torch.Generator().manual_seed(seed))  # fmt: skip
            per_repeat, nfe = out["per_repeat"].mean(1).tolist(), out["nfe"]
    finally:
        if net is not None:
            net.train(was_training)
    values = torch.tensor(per_repeat, dtype=torch.float64)
    return {
        "method": method,
        "bits_per_dim": float(values.mean()),
        "sem": float(values.std() / math.sqrt(repeats)) if repeats > 1 else math.nan,
        "per_repeat": [float(v) for v in values],
        "num_images": len(images),
        "seconds": time.perf_counter() - start,
        "nfe": nfe,
    }


def model_bits_per_dim(pipe, images: Tensor, method: str = "vlb", **options) -> dict:
    """`bits_per_dim` of a loaded model. The bound scores the model that samples, x0 thresholded
    as its manifest says (Ho et al.'s and improved DDPM's bound code clip x0 the same way; on the
    cosine digits model the unclipped x0 of the noisiest half of the chain costs 0.34 bits/dim);
    the ODE integrates the bare network's probability flow, which a clip would make non-smooth."""
    denoiser = pipe.condition(len(images))[0] if method == "vlb" else pipe.denoiser
    return bits_per_dim(denoiser, images, method, **options)
