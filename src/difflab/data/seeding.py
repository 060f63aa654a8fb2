"""Derive stable integer seeds from tuples of keys (seed, split, index, ...).

Why: generated sets must give the same item for the same (seed, index) forever, on any
machine and any length of set. numpy's ``SeedSequence`` hashes a key tuple with a documented,
version-stable algorithm, so we use it only as a hash and never rely on a distribution's stream.
"""

import numpy as np

SPLIT_CODES = {"train": 0, "test": 1}


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a non-negative int, else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def split_code(split: str) -> int:
    """Integer code of a generated set's split, so train and test draw from different streams."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    return SPLIT_CODES[split]


def derive_words(*keys: int, count: int = 1) -> np.ndarray:
    """``count`` uint32 words that depend only on ``keys`` (all non-negative ints)."""
    return np.random.SeedSequence([int(k) for k in keys]).generate_state(count, dtype=np.uint32)


def derive_seed(*keys: int) -> int:
    """One 63-bit seed for ``torch.Generator.manual_seed`` derived from ``keys``."""
    hi, lo = (int(w) for w in derive_words(*keys, count=2))
    return ((hi << 32) | lo) >> 1
