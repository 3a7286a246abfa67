"""Seeds: every random stream of a run is derived from one integer seed.

A stream is named by a seed and a few keys (``derive_seed(seed, "step", t, rank)``), so it can be
recreated from scratch at any point: nothing random has to be carried over (or saved) from one
step to the next, which is what makes resumed and multi-process runs repeatable.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by ``seed`` and ``keys`` (stable across runs and machines)."""
    text = "/".join(str(k) for k in (int(seed), *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore the global ``random``, NumPy and torch CPU generator states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
