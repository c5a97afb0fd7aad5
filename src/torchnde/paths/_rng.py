"""A counter-based random number generator on tensors.

Standard normals are a *pure function* of integer keys ``(seed, stream, node, element)``: no
generator state, so a value never depends on which other values were drawn, or in which order.
This is what lets a virtual Brownian tree regenerate any node on demand (Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3", for the counter-based idea).

Bits: per-element keys are 64-bit, made once per path with the splitmix64 finaliser (Steele, Lea
& Flood 2014, "Fast splittable pseudorandom number generators"; constants of Stafford's "Mix13") on
int64 tensors. The per-value work is 32-bit, which is several times cheaper on CPU: a node's
32-bit key (:func:`node_keys`, a bijective mix of the packed ``(stream, component, node)``) is
added to the element key's top 32 bits and mixed by ``lowbias32`` (Wellons 2018, "Hash function
prospector"; two multiply-xorshift rounds) on int32 tensors. Integer arithmetic wraps on every
backend and every right shift is masked to act as a logical shift, so the bits are identical on
any device.

Normals: the 32 bits give ``v = (2x + 1) 2**-32`` in ``(-1, 1)`` (never +-1) and ``z = sqrt(2)
erfinv(v)`` is computed in float64 (inverse-CDF sampling; tails reach about 6.2 sigma) and cast
to the requested dtype. The float64 erfinv may differ in the last ulp between backends. Two
``(node, element)`` pairs give the same normal only by a 32-bit coincidence (probability
``2**-32`` per pair); for one element, distinct nodes below ``2**28`` never share a key.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "mix64",
    "mix_tensor",
    "mix32_tensor",
    "node_keys",
    "element_keys",
    "element_keys32",
    "normals",
    "normals_into",
    "normals_numpy",
]

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
# lowbias32 (C. Wellons, "Hash function prospector", 2018): a 32-bit bijective mixer
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_M1S, _M2S = _M1, _M2 - (1 << 32)


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


def node_keys(stream, nodes, component=0) -> np.ndarray:
    """32-bit keys (an ``int32`` array) for node numbers ``nodes`` of a stream (``stream % 4`` is
    used) and a component ``< 4``: ``(stream, component, node)`` is packed into 32 bits and mixed by
    a bijection, so distinct nodes below ``2**28`` get distinct keys (larger node numbers are
    folded first and may share keys). ``stream`` and ``component`` may be int arrays that
    broadcast against ``nodes``."""
    n = np.asarray(nodes, dtype=np.uint64)
    low = n & np.uint64((1 << 28) - 1)
    with np.errstate(over="ignore"):
        folded = (low ^ ((n >> np.uint64(28)) * np.uint64(0x9E3779B1))) & np.uint64((1 << 28) - 1)
    return small_node_keys(folded.astype(np.uint32), key_tags(stream, component))


def key_tags(stream, component=0) -> np.ndarray:
    """The bits of ``(stream % 4, component)`` in a node key, as ``uint32`` (broadcasting)."""
    return (
        ((np.asarray(stream, dtype=np.uint64) & np.uint64(3)) << np.uint64(30))
        | ((np.asarray(component, dtype=np.uint64) & np.uint64(3)) << np.uint64(28))
    ).astype(np.uint32)


def small_node_keys(nodes: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """:func:`node_keys` of nodes below ``2**28`` (``uint32``, not folded) given their
    :func:`key_tags`: the same keys with a few numpy ops (for a chain of a few nodes)."""
    return _mix32_np(nodes | tags).view(np.int32)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """The ``lowbias32`` mixer on a ``uint32`` array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(_M1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(_M2)
        x = x ^ (x >> np.uint32(16))
    return x


def mix32_tensor(x: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """The ``lowbias32`` mixer on an int32 tensor, in place (returns ``x``); shifts are masked so
    they act as logical shifts, and int32 multiplication wraps modulo ``2**32``. ``tmp``: an
    optional int32 scratch tensor of ``x``'s shape (saves three temporaries)."""
    if tmp is None:
        tmp = torch.empty_like(x)
    for shift, mask, mult in ((16, 0xFFFF, _M1S), (15, 0x1FFFF, _M2S), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_(mask))
        if mult is not None:
            x.mul_(mult)
    return x


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


def element_keys32(elem_keys: torch.Tensor) -> torch.Tensor:
    """The 32 bits of each element key that :func:`normals` uses (an int32 tensor)."""
    return (elem_keys >> 32).to(torch.int32)


def normals_into(
    out: torch.Tensor, ek32: torch.Tensor, node_keys: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor, rows=None
) -> torch.Tensor:
    """:func:`normals` without temporaries: writes the float64 normals ``(R, C)`` into ``out``.

    ``ek32``: :func:`element_keys32`, ``(C,)`` (or ``(rows, C)`` with ``rows`` an int64 tensor of
    ``R`` row numbers); ``node_keys``: an int32 tensor ``(R,)``; ``bits``, ``tmp``: int32 scratch
    tensors ``(R, C)``. Same values as :func:`normals`, bit for bit."""
    nk = node_keys.view(-1, 1)
    if rows is None:
        torch.add(nk, ek32.view(1, -1), out=bits)
    else:
        torch.index_select(ek32, 0, rows, out=bits).add_(nk)
    mix32_tensor(bits, tmp)
    # v = (2x + 1) 2**-32 = (x + 1/2) 2**-31, exact in float64
    return out.copy_(bits).add_(0.5).mul_(2.0**-31).erfinv_().mul_(math.sqrt(2.0))


def normals_numpy(ek32: np.ndarray, node_keys: np.ndarray) -> np.ndarray:
    """:func:`normals_into` on the CPU for a few rows, in numpy (a fraction of torch's per-op cost
    on small arrays): float64 normals ``(R, C)`` for ``ek32`` (``(C,)``, :func:`element_keys32` as
    an int32 array) and int32 ``node_keys`` ``(R,)``. The same bits (wrapping uint32 arithmetic is
    the int32 arithmetic of :func:`mix32_tensor`), the same exact steps to ``v``, and torch's
    ``erfinv``: the same values, bit for bit."""
    with np.errstate(over="ignore"):
        bits = node_keys.view(np.uint32)[:, None] + ek32.view(np.uint32)[None, :]
    v = (_mix32_np(bits).view(np.int32).astype(np.float64) + 0.5) * 2.0**-31
    return torch.from_numpy(v).erfinv_().mul_(math.sqrt(2.0)).numpy()


def normals(elem_keys: torch.Tensor, node_keys, dtype=torch.float64, rows=None) -> torch.Tensor:
    """Standard normals ``(len(node_keys), C)``: row ``i`` element ``j`` is a pure function of
    ``(node_keys[i], elem_keys[j])``. ``node_keys``: 32-bit keys from :func:`node_keys` (an int32
    array or tensor, one per row). ``elem_keys``: from :func:`element_keys`.

    With ``rows`` (an int64 tensor, one entry per node key), ``elem_keys`` is a ``(R, C)`` table and
    row ``i`` uses the element keys ``elem_keys[rows[i]]`` (per-sample trees); otherwise
    ``elem_keys`` is a ``(C,)`` vector shared by all rows.

    Bits: ``lowbias32(node_key + element_key)`` in int32 arithmetic (the top 32 bits of the 64-bit
    element key). Normal: the 32 bits as a uniform ``v = (2x + 1) 2**-32`` in ``(-1, 1)`` and
    ``z = sqrt(2) erfinv(v)`` in float64 (tails to about 6.2 sigma)."""
    dev = elem_keys.device
    nk = torch.as_tensor(np.asarray(node_keys, dtype=np.int32), device=dev).reshape(-1)
    ek = element_keys32(elem_keys)
    cols = ek.shape[-1]
    shape = (nk.shape[0], cols)
    bits = torch.empty(shape, dtype=torch.int32, device=dev)
    z = torch.empty(shape, dtype=torch.float64, device=dev)
    normals_into(z, ek, nk, bits, torch.empty_like(bits), rows=rows)
    return z if dtype == torch.float64 else z.to(dtype)
