"""Every seed kdaudit derives from a run's seed, in one place.

Each function keeps the value its stream has always had: changing one changes every result
that depends on it (the smoke tables are compared byte for byte across refactors). Streams
that share a multiplier draw from different generators, so their seeds may coincide.
"""
from __future__ import annotations

PER_INDEX = 1_000_003          # per epoch, per process
REFERENCE_HALF = 7907          # LiRA / RMIA training halves
CANARIES = 7919                # the canaries' secrets
EXTERNAL = 7_777_777           # the builtin external model (ref_ext): corpus and weights


def per_index(seed: int, index: int) -> int:
    """The seed of one epoch's batch order, or of one process's sampling."""
    return seed * PER_INDEX + index


def reference_half(seed: int, k: int) -> int:
    """The seed that draws the k-th random half of the audited records."""
    return seed * REFERENCE_HALF + k


def canaries(seed: int) -> int:
    return seed + CANARIES


def external(seed: int) -> int:
    return seed + EXTERNAL


def reference_model(seed: int, k: int) -> int:
    """The training seed of the k-th reference teacher and its students."""
    return seed + k + 1
