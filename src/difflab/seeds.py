"""Stable integer seeds derived from tuples of keys (seed, split, index, ...).

Why: generated sets, training steps and samples must get the same draws for the same keys
forever, on any machine. numpy's ``SeedSequence`` hashes a key tuple with a documented,
version-stable algorithm, so we use it only as a hash and never rely on a distribution's stream.
This module imports nothing of difflab, so inference code can use it without the data sets.
"""

import numpy as np


def derive_words(*keys: int, count: int = 1) -> np.ndarray:
    """``count`` uint32 words that depend only on ``keys`` (all non-negative ints)."""
    return np.random.SeedSequence([int(k) for k in keys]).generate_state(count, dtype=np.uint32)


def derive_seed(*keys: int) -> int:
    """One 63-bit seed for ``torch.Generator.manual_seed`` derived from ``keys``."""
    hi, lo = (int(w) for w in derive_words(*keys, count=2))
    return ((hi << 32) | lo) >> 1
