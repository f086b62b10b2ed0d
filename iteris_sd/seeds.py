"""Seeds: every integer a seed plus an offset makes, folded into torch's seed range.

``torch.Generator.manual_seed`` takes -2^63 .. 2^64 - 1 and reads a negative seed as its
two's complement, so it draws from seed mod 2^64. A user seed goes up to 2^64 - 1 (the
ComfyUI widget's maximum) and offsets (per concept, per prompt, per layer) are added to
it, so the sum is folded here, once, before it is seeded.
"""

from __future__ import annotations

SEED_MODULUS = 2**64


def fold_seed(seed: int) -> int:
    """seed mod 2^64, in 0 .. 2^64 - 1: the same generator torch draws for every seed it
    already accepted, and a valid seed for every other integer."""
    return int(seed) % SEED_MODULUS
