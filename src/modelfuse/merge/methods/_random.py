"""The random stream of the random drops (DARE, DELLA): counter-based SplitMix64 draws."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def model_seeds(generator: torch.Generator | None, draw: Sequence[bool], device: torch.device) -> list[int]:
    """One seed per model that draws (in model order) from ``generator``; 0 for the others."""
    seeds = []
    for d in draw:
        if d:
            seeds.append(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
        else:
            seeds.append(0)
    return seeds


#: SplitMix64 (Steele, Lea & Flood 2014): the state advances by GOLDEN, the output mixes it
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random draws of one model: u_j for positions j in [start, start + count), float32.

    u_j is output j of SplitMix64 seeded with ``seed`` (state seed + (j + 1) * GOLDEN mod 2^64,
    mixed), its top 24 bits times 2^-24: uniform on the float32 grid of [0, 1) that
    ``torch.rand`` uses. A counter-based stream: any block of positions is drawn alone, in
    any order, on any device, by the torch code and by the C kernels alike (which do this
    in their loops).
    """
    x = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    x.mul_(_int64(GOLDEN)).add_(_int64(seed))
    x ^= _shift_right(x, 30)
    x.mul_(_int64(MIX1))
    x ^= _shift_right(x, 27)
    x.mul_(_int64(MIX2))
    x ^= _shift_right(x, 31)
    return _shift_right(x, 40).to(torch.float32).mul_(2.0**-24)
