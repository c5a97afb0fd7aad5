"""Lévy-area statistics: the Gaussian algebra of Brownian intervals.

Over ``[a, a + l]`` the Brownian paths carry, in float64, the *local* statistics
``X = (W, I, J)`` with ``W = W(a+l) - W(a)``, ``I = int_a^{a+l} (W(u) - W(a)) du`` and
``J = int_a^{a+l} (W(u) - W(a)) (u - a) du`` (only the first 1, 2 or 3 of them, depending on
``levy_area``). They are jointly Gaussian with covariance
``[[l, l^2/2, l^3/3], [l^2/2, l^3/3, 5 l^4/24], [l^3/3, 5 l^4/24, 2 l^5/15]]``, they combine
exactly over adjacent intervals (``W = W1 + W2``, ``I = I1 + l2 W1 + I2``,
``J = J1 + W1 (l^2 - l1^2)/2 + J2 + l1 I2``), and an interval is split by exact Gaussian
conditioning of the left part on the whole. The Lévy areas are read off at the end:
``H = I/h - W/2`` (space-time, variance ``h/12``) and ``K = I/(2h) - J/h^2 + W/12``
(space-time-time, variance ``h/720``), independent of ``W`` and of each other (Foster 2020,
"Numerical approximations for stochastic differential equations", DPhil thesis, Oxford; Foster,
Lyons & Oberhauser 2020, "An optimal polynomial approximation of Brownian motion").

This module holds the covariance, combination and split matrices (one interval, or arrays of
intervals at once) and the conversion of local statistics to ``(W, H, K)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._base import BrownianIncrement


def _cov(length: float, d: int) -> np.ndarray:
    el = length
    c = np.array(
        [
            [el, el**2 / 2, el**3 / 3],
            [el**2 / 2, el**3 / 3, 5 * el**4 / 24],
            [el**3 / 3, 5 * el**4 / 24, 2 * el**5 / 15],
        ]
    )
    return c[:d, :d]


def _combine_mats(l1: float, l2: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    el = l1 + l2
    c1 = np.array([[1.0, 0.0, 0.0], [l2, 1.0, 0.0], [(el * el - l1 * l1) / 2, 0.0, 1.0]])
    c2 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, l1, 1.0]])
    return c1[:d, :d], c2[:d, :d]


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return v * np.sqrt(np.clip(w, 0.0, None))


_UNIT_SQRT: dict = {}


def _unit_sqrt(d: int) -> np.ndarray:
    """``_psd_sqrt(_cov(1.0, d))``, computed once per ``d`` (a constant)."""
    out = _UNIT_SQRT.get(d)
    if out is None:
        out = _UNIT_SQRT[d] = _psd_sqrt(_cov(1.0, d))
    return out


def _split_mats(r: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Left part ``[0, r]`` of a unit interval given the whole: ``X1 = A X + B z``, ``z ~ N(0, I)``
    (in the normalised coordinates of the unit interval)."""
    if d == 1:
        return np.array([[r]]), np.array([[math.sqrt(max(r * (1 - r), 0.0))]])
    if r <= 0.0:
        return np.zeros((d, d)), np.zeros((d, d))
    if r >= 1.0:
        return np.eye(d), np.zeros((d, d))
    c1, _ = _combine_mats(r, 1 - r, d)
    s11 = _cov(r, d)
    cross = s11 @ c1.T  # Cov(X1, X)
    a = np.linalg.solve(_cov(1.0, d), cross.T).T
    cond = s11 - a @ cross.T
    return a, _psd_sqrt(cond)


def _scale_rows(lengths: np.ndarray, d: int) -> np.ndarray:
    """:func:`_scale` of many lengths at once, ``(n, d)``."""
    return np.asarray(lengths, dtype=np.float64)[:, None] ** np.array([0.5, 1.5, 2.5])[:d]


def _scale(length: float, d: int) -> np.ndarray:
    return np.array([length**0.5, length**1.5, length**2.5])[:d]


def _split_scaled(r: float, length: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``X1 = A X + B z`` for the left part ``[a, a + r l]`` of an interval of length ``l``."""
    a, b = _split_mats(r, d)
    s = _scale(length, d)
    return (s[:, None] * a) / s[None, :], s[:, None] * b


def _uncombine_scaled(r: float, length: float, d: int, a: np.ndarray, b: np.ndarray):
    """The right part given the whole and ``X1 = A X + B z``: ``X2 = C2^-1 (X - C1 X1)``."""
    l1 = r * length
    c1, c2 = _combine_mats(l1, length - l1, d)
    c2i = np.linalg.inv(c2)
    return c2i @ (np.eye(d) - c1 @ a), -c2i @ c1 @ b


def _to_levy(x: torch.Tensor, h: float, d: int, sign: float, dtype, layout) -> BrownianIncrement:
    """Local stats over an interval of length ``h > 0`` -> (W, H, K), reversed if ``sign < 0``."""
    w = x[0] if sign > 0 else -x[0]
    hh = kk = None
    if d >= 2:
        hh = torch.add(x[1], x[0], alpha=-h / 2).mul_(1.0 / h) if h > 0 else torch.zeros_like(x[0])
    if d >= 3:
        if h > 0:
            kk = torch.add(x[0], x[1], alpha=6.0 / h).sub_(x[2], alpha=12.0 / (h * h)).mul_(1.0 / 12)
            if sign < 0:
                kk.neg_()
        else:
            kk = torch.zeros_like(x[0])
    conv = (lambda v: layout.split(v.to(dtype))) if x.dtype != dtype else layout.split
    return BrownianIncrement(dt=None, W=conv(w), H=None if hh is None else conv(hh), K=None if kk is None else conv(kk))


def _cov_many(lengths: np.ndarray, d: int) -> np.ndarray:
    """:func:`_cov` for an array of lengths: ``(P, d, d)``."""
    el = np.asarray(lengths, dtype=np.float64)
    c = np.empty((el.shape[0], 3, 3))
    c[:, 0, 0] = el
    c[:, 0, 1] = c[:, 1, 0] = el**2 / 2
    c[:, 0, 2] = c[:, 2, 0] = c[:, 1, 1] = el**3 / 3
    c[:, 1, 2] = c[:, 2, 1] = 5 * el**4 / 24
    c[:, 2, 2] = 2 * el**5 / 15
    return c[:, :d, :d]


def _combine_many(l1: np.ndarray, l2: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_combine_mats` for arrays of lengths: ``X = C1 X1 + C2 X2``, each ``(P, d, d)``."""
    n = l1.shape[0]
    c1 = np.zeros((n, 3, 3))
    c2 = np.zeros((n, 3, 3))
    c1[:, [0, 1, 2], [0, 1, 2]] = 1.0
    c2[:, [0, 1, 2], [0, 1, 2]] = 1.0
    c1[:, 1, 0] = l2
    c1[:, 2, 0] = ((l1 + l2) ** 2 - l1 * l1) / 2
    c2[:, 2, 1] = l1
    return c1[:, :d, :d], c2[:, :d, :d]


def _split_many(r: np.ndarray, length: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Stats of ``[a, a + r l]`` inside an interval ``[a, a + l]`` with stats ``X``: ``A X + B z``
    with ``z ~ N(0, I)``, exact Gaussian conditioning; ``A, B`` of shape ``(P, d, d)``."""
    r = np.asarray(r, dtype=np.float64)
    n = r.shape[0]
    if d == 1:
        a = r.reshape(n, 1, 1)
        b = np.sqrt(np.clip(r * (1 - r), 0.0, None) * length).reshape(n, 1, 1)
        return a, b
    inside = (r > 0) & (r < 1)
    ru = np.where(inside, r, 0.5)  # unit-interval coordinates, then scaled by powers of length
    c1, _ = _combine_many(ru, 1 - ru, d)
    s11 = _cov_many(ru, d)
    cross = s11 @ np.swapaxes(c1, 1, 2)  # Cov(X1, X)
    a = np.swapaxes(np.linalg.solve(_cov(1.0, d), np.swapaxes(cross, 1, 2)), 1, 2)
    cond = s11 - a @ np.swapaxes(cross, 1, 2)
    w, v = np.linalg.eigh((cond + np.swapaxes(cond, 1, 2)) / 2)
    b = v * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    a[~inside] = 0.0
    b[~inside] = 0.0
    a[r >= 1] = np.eye(d)
    s = _scale(length, d)
    return s[None, :, None] * a / s[None, None, :], s[None, :, None] * b


def _position_maps(start: np.ndarray, end: np.ndarray, h: np.ndarray, d: int) -> np.ndarray:
    """How a piece ``[start, end]`` (relative to the start of an interval of length ``h``) enters
    the interval's stats: ``W += W_j``, ``I += I_j + (h - end) W_j``,
    ``J += J_j + start I_j + (h^2 - end^2)/2 W_j`` (exact combination; ``(P, d, d)``)."""
    m = np.zeros((start.shape[0], 3, 3))
    m[:, [0, 1, 2], [0, 1, 2]] = 1.0
    m[:, 1, 0] = h - end
    m[:, 2, 0] = (h * h - end * end) / 2
    m[:, 2, 1] = start
    return m[:, :d, :d]


def _levy_rows(x: torch.Tensor, h: np.ndarray, sign: np.ndarray, dtype, work=None):
    """Local stats ``(Q, d, C)`` over intervals of lengths ``h`` -> ``(W, H, K)``, each ``(Q, C)`` in
    ``dtype`` (or None), reversed where ``sign < 0`` (``W -> -W``, ``H -> H``, ``K -> -K``). The
    results never share memory with ``x``; intermediates go to ``work`` (a :class:`_Work`)."""
    q, d, c = x.shape
    dev = x.device

    def buf(name):
        if work is None:
            return torch.empty(q, c, dtype=x.dtype, device=dev)
        return work.get(name, q * c, x.dtype).view(q, c)

    w = x[:, 0]
    flip = bool((sign < 0).any())
    sg = torch.as_tensor(sign, dtype=x.dtype, device=dev).view(-1, 1) if flip else None
    hh = kk = None
    if d >= 2:
        pos = h > 0
        hq = torch.as_tensor(np.where(pos, h, 1.0), dtype=x.dtype, device=dev).view(-1, 1)
        inv = torch.as_tensor(np.where(pos, 1.0 / np.where(pos, h, 1.0), 0.0), dtype=x.dtype, device=dev)
        inv = inv.view(-1, 1)
        # H = (I - W h/2) / h
        hh = torch.mul(x[:, 0], hq / 2, out=buf("levy_h"))
        hh = torch.sub(x[:, 1], hh, out=hh).mul_(inv)
        if d >= 3:
            # K = (W + 6 I / h - 12 J / h^2) / 12
            kk = torch.mul(x[:, 1], 6.0 * inv, out=buf("levy_k"))
            kk = torch.add(x[:, 0], kk, out=kk)
            kk.sub_(torch.mul(x[:, 2], 12.0 * inv * inv, out=buf("levy_tmp"))).mul_(inv * hq / 12)
            if flip:
                kk.mul_(sg)
    if flip:
        w = torch.mul(w, sg, out=buf("levy_w"))
    return tuple(None if v is None else v.to(dtype, copy=True) for v in (w, hh, kk))
