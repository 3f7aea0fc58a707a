"""The held-out rule, one definition for every verb: which store samples are never trained on.

A sample is held out when the first 4 bytes of its content hash (``sample_hash``, blake2b-128 of its
tokens), read as a fraction of 2**32, fall below ``fraction``. The rule depends on the tokens only,
so it is stable across re-sharding, resumes and DDP ranks; ``kdship train`` evaluates on these
samples and ``kdship export`` measures the student's KL to the teacher on the same ones (the run's
fraction comes from its manifest, ``kdship.run_manifest``).
"""

from __future__ import annotations

import numpy as np

DEFAULT_HELDOUT_FRACTION = 0.02


def heldout_mask(sample_hash: np.ndarray, fraction: float) -> np.ndarray:
    """[S] bool: samples held out for evaluation, from their content hash [S, 16] uint8."""
    if fraction <= 0 or len(sample_hash) == 0:
        return np.zeros(len(sample_hash), dtype=bool)
    u = sample_hash[:, :4].astype(np.uint64)
    val = (u[:, 0] << 24) | (u[:, 1] << 16) | (u[:, 2] << 8) | u[:, 3]
    return val.astype(np.float64) / 2.0**32 < fraction
