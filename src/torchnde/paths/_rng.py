"""A counter-based random number generator on tensors.

Standard normals are a *pure function* of integer keys ``(seed, stream, node, element)``: no
generator state, so a value never depends on which other values were drawn, or in which order.
This is what lets a virtual Brownian tree regenerate any node on demand (Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3", for the counter-based idea).

Bits: a key is mixed with the splitmix64 finaliser (Steele, Lea & Flood 2014, "Fast splittable
pseudorandom number generators"; the constants are the published ones of Stafford's "Mix13")
implemented with int64 tensor ops. Integer arithmetic wraps modulo 2**64 on every backend, and
torch's ``>>`` on int64 is arithmetic, so every right shift is masked to make it logical. The bits
are therefore identical on any device.

Normals: the top 53 bits give a uniform ``u`` in ``(0, 1)`` (never 0 or 1); ``z = sqrt(2)
erfinv(2u - 1)`` is computed in float64 (inverse-CDF sampling; tails reach about 8.2 sigma) and
cast to the requested dtype. The float64 erfinv may differ in the last ulp between backends.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mix64", "key", "mix_tensor", "element_keys", "normals"]

_MASK64 = (1 << 64) - 1
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(x: int) -> int:
    """A Python int in [0, 2**64) as the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_C1S = _signed(_C1)
_C2S = _signed(_C2)
_GOLDENS = _signed(_GOLDEN)


def mix64(x: int) -> int:
    """splitmix64 finaliser on a Python int (unsigned 64-bit result)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _C1) & _MASK64
    x ^= x >> 27
    x = (x * _C2) & _MASK64
    x ^= x >> 31
    return x


def key(stream: int, node: int, component: int = 0) -> int:
    """One signed 64-bit key for ``(stream < 256, node < 2**54, component < 4)``: the three are
    packed injectively into 64 bits and mixed once."""
    packed = (stream << 56) | (component << 54) | node
    return _signed(mix64(packed * _GOLDEN + 0x243F6A8885A308D3))


def mix_tensor(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor, in place (returns ``x``)."""
    x.bitwise_xor_((x >> 30).bitwise_and_((1 << 34) - 1))
    x.mul_(_C1S)
    x.bitwise_xor_((x >> 27).bitwise_and_((1 << 37) - 1))
    x.mul_(_C2S)
    x.bitwise_xor_((x >> 31).bitwise_and_((1 << 33) - 1))
    return x


def element_keys(seed, num_elements: int, device=None) -> torch.Tensor:
    """Per-element keys ``(rows * num_elements,)`` for a seed (int) or per-row seeds (int64 tensor
    ``(B,)``). Element ``c`` of row ``b`` depends only on ``(seed[b], c)``, so a row equals the keys
    of a single-seed call with that seed."""
    if isinstance(seed, torch.Tensor):
        seeds = seed.to(device=device, dtype=torch.int64).reshape(-1, 1)
    else:
        seeds = torch.tensor([[_signed(int(seed))]], dtype=torch.int64, device=device)
    s = mix_tensor(seeds ^ _signed(0x5851F42D4C957F2D))
    idx = torch.arange(num_elements, dtype=torch.int64, device=device).mul_(_GOLDENS)
    return mix_tensor(s + idx).reshape(-1)


def normals(elem_keys: torch.Tensor, node_keys, dtype=torch.float64) -> torch.Tensor:
    """Standard normals ``(len(node_keys), len(elem_keys))``: row ``i`` element ``j`` is a pure
    function of ``(node_keys[i], elem_keys[j])``. ``node_keys`` is a list of signed 64-bit ints (see
    :func:`key`) or an int64 tensor (one key per row)."""
    if not isinstance(node_keys, torch.Tensor):
        node_keys = torch.tensor(node_keys, dtype=torch.int64, device=elem_keys.device)
    x = mix_tensor(node_keys.reshape(-1, 1) + elem_keys.reshape(1, -1))
    m = (x >> 11).bitwise_and_((1 << 53) - 1)
    v = m.to(torch.float64).mul_(2.0**-52).add_(2.0**-53 - 1.0)  # (m + 1/2) 2**-52 - 1 in (-1, 1)
    z = v.erfinv_().mul_(math.sqrt(2.0))
    return z if dtype == torch.float64 else z.to(dtype)
