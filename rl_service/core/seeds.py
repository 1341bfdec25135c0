"""Seeds, shared by managed runs and named policies: the accepted range, checked, and a fresh one when none given."""

from __future__ import annotations

import secrets

from rl_service.core.errors import InvalidRequest

MAX_SEED = 2**32 - 1  # numpy's and Gymnasium's seeds are unsigned 32-bit


def seed_or_random(seed: int | None, field: str) -> int:
    """`seed` if it is in [0, MAX_SEED]; a random one when None; InvalidRequest naming `field` otherwise."""
    if seed is None:
        return secrets.randbelow(MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"{field}: must be in [0, {MAX_SEED}], got {seed}", field=field)
    return seed
