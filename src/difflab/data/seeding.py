"""Seeds of generated data sets: (seed, split, index, ...) -> a stable integer seed.

Why: generated sets must give the same item for the same (seed, index) forever, on any
machine and any length of set; `derive_seed` (from `difflab.seeds`, where it lives so that
inference code can use it without importing the data sets) hashes the keys.
"""

import numpy as np

from difflab.seeds import derive_seed, derive_words

__all__ = ["SPLIT_CODES", "check_seed", "derive_seed", "derive_words", "split_code"]

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
