r"""HiPPO matrices: linear ODEs whose state is the projection of an input's history onto a
polynomial (or Fourier) basis.

Gu, Dao, Ermon, Rudra, Ré, *HiPPO: Recurrent Memory with Optimal Polynomial Projections*
(NeurIPS 2020); Gu, Johnson, Timalsina, Rudra, Ré, *How to Train Your HiPPO: State Space Models
with Generalized Orthogonal Basis Projections* (ICLR 2023).

Every function returns ``(A, B)`` with ``A`` of shape ``(N, N)`` and ``B`` of shape ``(N,)`` such
that the coefficients ``c(t)`` of the projection of an input ``u`` follow

* LegS (scaled Legendre, measure uniform on ``[0, t]``): :math:`\dot c = \frac{1}{t}(A c + B u)`;
* LegT, LagT, FouT (translated measures): :math:`\dot c = A c + B u`.

The matrices are written in the orthonormal basis (each basis function has unit norm under
its probability measure), so ``c`` is exactly the vector of coefficients
:math:`c_n(t) = \langle u, g^{(t)}_n \rangle_{\mu^{(t)}}` stated in each docstring; the
derivations are in docs/sequence.md. For LegS and LagT the ODE is exact for every input;
LegT and FouT need the input's value at the far end of the window, which they take from the
reconstruction, so they are exact only when the input lies in the span of the basis.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["hippo_legs", "hippo_legt", "hippo_lagt", "hippo_fout"]


def _check_n(name: str, N) -> int:
    if isinstance(N, bool) or not isinstance(N, numbers.Integral) or N < 1:
        raise ValueError(f"{name}(N=...) must be a positive int (the number of basis functions), got {N!r}")
    return int(N)


def _dtype(name: str, dtype):
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}(dtype=...) must be a real floating dtype such as torch.float64, got {dtype!r}")
    return dtype


def _sqrt_odd(N: int) -> torch.Tensor:
    return torch.sqrt(2.0 * torch.arange(N, dtype=torch.float64) + 1.0)


def hippo_legs(N: int, *, dtype: torch.dtype | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""HiPPO-LegS (Gu et al. 2020, Theorem 2): scaled Legendre measure, uniform on ``[0, t]``.

    The state is :math:`c_n(t) = \frac{1}{t}\int_0^t u(s)\,\sqrt{2n+1}\,P_n(2s/t - 1)\,ds`, the
    coefficients of the projection of ``u`` on ``[0, t]`` onto the Legendre polynomials
    :math:`P_n` scaled to ``[0, t]`` and normalised to unit norm under the uniform probability
    measure. It follows :math:`t\,\dot c = A c + B u` exactly, with

    .. math:: A_{nk} = -\begin{cases}\sqrt{(2n+1)(2k+1)} & n > k\\ n + 1 & n = k\\ 0 & n < k\end{cases},
              \qquad B_n = \sqrt{2n+1}.

    As :math:`t \to 0^+`, :math:`c(t) \to u(0)\,e_0`; the singular ``1/t`` means a solve should
    start at some ``t0 > 0`` (with ``c(t0)`` known) or in log-time (:math:`dc/d\log t = A c + B u`).

    Args:
        N: the number of basis functions (the state size).
        dtype, device: of the returned tensors (default: PyTorch's default dtype, CPU).

    Returns:
        ``(A, B)`` of shapes ``(N, N)`` and ``(N,)``.
    """
    N = _check_n("hippo_legs", N)
    dtype = _dtype("hippo_legs", dtype)
    q = _sqrt_odd(N)
    A = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(torch.arange(1, N + 1, dtype=torch.float64))
    return A.to(dtype=dtype, device=device), q.to(dtype=dtype, device=device)


def hippo_legt(
    N: int, theta: float = 1.0, *, dtype: torch.dtype | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""HiPPO-LegT (Gu et al. 2020; the Legendre Memory Unit of Voelker et al. 2019, in the
    orthonormal basis): translated Legendre measure, uniform on the window ``[t - theta, t]``.

    The state is :math:`c_n(t) = \frac{1}{\theta}\int_{t-\theta}^t u(s)\,\sqrt{2n+1}\,
    P_n\big(2(s-t)/\theta + 1\big)\,ds` and follows :math:`\dot c = A c + B u` with

    .. math:: A_{nk} = -\frac{\sqrt{(2n+1)(2k+1)}}{\theta}\begin{cases}1 & k < n\\
              (-1)^{n-k} & k \ge n\end{cases}, \qquad B_n = \frac{\sqrt{2n+1}}{\theta}.

    The ODE replaces the input leaving the window, :math:`u(t-\theta)`, by its reconstruction
    from ``c``, so it is exact when ``u`` is a polynomial of degree below ``N``.

    Args:
        N: the number of basis functions.
        theta: the window length (> 0).
        dtype, device: of the returned tensors.

    Returns:
        ``(A, B)`` of shapes ``(N, N)`` and ``(N,)``.
    """
    N = _check_n("hippo_legt", N)
    dtype = _dtype("hippo_legt", dtype)
    if not isinstance(theta, numbers.Real) or not theta > 0:
        raise ValueError(f"hippo_legt(theta=...) must be a positive number (the window length), got {theta!r}")
    q = _sqrt_odd(N)
    n = torch.arange(N)
    sign = torch.where(n[None, :] < n[:, None], 1.0, (-1.0) ** (n[:, None] - n[None, :]).abs().double())
    A = -(q[:, None] * q[None, :]) * sign / theta
    return A.to(dtype=dtype, device=device), (q / theta).to(dtype=dtype, device=device)


def hippo_lagt(N: int, *, dtype: torch.dtype | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""HiPPO-LagT (Gu et al. 2020): Laguerre polynomials under the exponentially decaying
    measure :math:`e^{-(t-s)}` on :math:`(-\infty, t]`.

    The state is :math:`c_n(t) = \int_{-\infty}^t u(s)\,L_n(t-s)\,e^{-(t-s)}\,ds` (the
    :math:`L_n` are orthonormal under :math:`e^{-x}dx` on :math:`[0, \infty)`) and follows
    :math:`\dot c = A c + B u` exactly, with :math:`A_{nk} = -1` for :math:`k \le n` (0 above the
    diagonal) and :math:`B_n = 1`.

    Args:
        N: the number of basis functions.
        dtype, device: of the returned tensors.

    Returns:
        ``(A, B)`` of shapes ``(N, N)`` and ``(N,)``.
    """
    N = _check_n("hippo_lagt", N)
    dtype = _dtype("hippo_lagt", dtype)
    A = -torch.tril(torch.ones(N, N, dtype=dtype, device=device))
    return A, torch.ones(N, dtype=dtype, device=device)


def hippo_fout(N: int, *, dtype: torch.dtype | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""HiPPO-FouT (Gu et al. 2023, "How to Train Your HiPPO"): the Fourier basis on the sliding
    window ``[t - 1, t]``.

    The basis, in :math:`s = x - (t - 1) \in [0, 1]`, is :math:`p_0 = 1`,
    :math:`p_{2k-1} = \sqrt2\cos(2\pi k s)`, :math:`p_{2k} = \sqrt2\sin(2\pi k s)`; the state is
    :math:`c_n(t) = \int_{t-1}^t u(x)\,p_n(x - t + 1)\,dx` and follows :math:`\dot c = A c + B u`
    with :math:`B = 2p(0)` and :math:`A = -2\,p(0)p(0)^\top + R`, where ``R`` rotates each
    (cos, sin) pair at frequency :math:`2\pi k`. The input leaving the window is replaced by
    :math:`2\,p(0)^\top c - u(t)` (a Fourier series converges to the mean of its two end
    values), so the ODE is exact for a 1-periodic trigonometric polynomial within the basis.

    Args:
        N: the number of basis functions (``N`` even ends on a cosine).
        dtype, device: of the returned tensors.

    Returns:
        ``(A, B)`` of shapes ``(N, N)`` and ``(N,)``.
    """
    N = _check_n("hippo_fout", N)
    dtype = _dtype("hippo_fout", dtype)
    n = torch.arange(N)
    p0 = torch.where(n == 0, 1.0, torch.where(n % 2 == 1, math.sqrt(2.0), 0.0)).double()
    A = -2.0 * p0[:, None] * p0[None, :]
    for m in range(1, N, 2):  # m = 2k - 1 (cosine), m + 1 = 2k (sine)
        if m + 1 < N:
            freq = 2.0 * math.pi * ((m + 1) // 2)
            A[m, m + 1] += freq
            A[m + 1, m] -= freq
    return A.to(dtype=dtype, device=device), (2.0 * p0).to(dtype=dtype, device=device)
