r"""Diagonal state-space layers: ``S4D`` (one single-input system per channel) and ``S5`` (one
multi-input system shared by the channels), with exact discretisation on irregular grids.

Each layer is the linear ODE :math:`\dot x = A x + B u`, :math:`y = 2\,\mathrm{Re}(C x) + D u`
with a diagonal complex ``A`` whose modes come in conjugate pairs (only one of each pair is
stored, hence the factor 2). Over a step of length :math:`\Delta` with the input held at the
value observed at the step's end (zero-order hold),

.. math:: x_l = \bar A_l x_{l-1} + \bar B_l u_l,\qquad \bar A_l = e^{\Delta_l A},\qquad
          \bar B_l = \frac{e^{\Delta_l A} - 1}{A} B

is the exact solution, so a per-sample, per-step :math:`\Delta_l` costs nothing extra. The
bilinear (Tustin) rule :math:`\bar A = (1 + \Delta A/2)/(1 - \Delta A/2)`,
:math:`\bar B = \Delta B/(1 - \Delta A/2)` is offered as in S4.

Numerical choices:

* :math:`e^{\Delta A} - 1` is computed by ``torch.expm1`` (complex), so a small
  :math:`|\Delta A|` keeps its relative accuracy; ``A`` never vanishes because its real part is
  :math:`-e^{a}` < 0.
* The time-varying recurrence is computed by a log-depth (Hillis–Steele) inclusive scan with the
  associative operator :math:`(a, b)\circ(a', b') = (a a', a' b + b')`: :math:`\lceil\log_2
  L\rceil` vectorised passes over the sequence. Every factor has :math:`|a| \le 1`, so no
  product overflows; the alternative closed form with cumulative products,
  :math:`x_l = P_l \sum_{j \le l} b_j / P_j`, divides by :math:`P_j` that underflow for fast
  modes and is not used.
* On a regular grid ``S4D`` uses its convolution kernel
  :math:`K_m = 2\,\mathrm{Re}(C \bar A^m \bar B)` (a Vandermonde product, with
  :math:`\bar A^m = e^{m \Delta A}` evaluated directly), applied with an FFT of length ``2L``.

References: Gu, Gupta, Goel, Ré, *On the Parameterization and Initialization of Diagonal State
Space Models* (S4D, NeurIPS 2022); Gu, Goel, Ré, *Efficiently Modeling Long Sequences with
Structured State Spaces* (S4, ICLR 2022); Smith, Warrington, Linderman, *Simplified State Space
Layers for Sequence Modeling* (S5, ICLR 2023); Gu et al., *HiPPO* (2020).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._hippo import hippo_legs

__all__ = ["S4D", "S5", "discretise_diagonal", "diagonal_scan"]

_INITS = ("legs", "inv", "lin")
_METHODS = ("zoh", "bilinear")


def discretise_diagonal(A: torch.Tensor, dt: torch.Tensor, method: str = "zoh") -> tuple[torch.Tensor, torch.Tensor]:
    r"""Discretise the diagonal system :math:`\dot x = A x + B u` over steps ``dt``.

    Args:
        A: complex diagonal of ``A`` (any shape), with negative real part.
        dt: step lengths (real, >= 0), broadcastable against ``A``.
        method: ``"zoh"`` (exact for an input held constant over the step) or ``"bilinear"``.

    Returns:
        ``(A_bar, gamma)`` broadcast against each other, with :math:`\bar B = \gamma B`:
        ZOH :math:`(e^{\Delta A}, \mathrm{expm1}(\Delta A)/A)`; bilinear
        :math:`((1+\Delta A/2)/(1-\Delta A/2), \Delta/(1-\Delta A/2))`.
    """
    if method == "zoh":
        # torch's complex expm1 keeps its relative accuracy near 0 (checked against mpmath:
        # 6e-16 for |dt*A| from 1e-8 to 1e3), and its backward reuses the result; 1/A is small,
        # so no large complex division is made (its backward would make two)
        em1 = torch.expm1(dt * A)
        return em1 + 1.0, em1 * torch.reciprocal(A)
    if method == "bilinear":
        dtA = dt * A
        inv = torch.reciprocal(1.0 - dtA / 2)
        return (1.0 + dtA / 2) * inv, dt * inv
    raise ValueError(f"discretisation must be one of {_METHODS}, got {method!r}")


def _chunk_size(L: int) -> int:
    """About sqrt(L); a divisor of L when one is near (no leftover steps to join on)."""
    r = math.isqrt(L - 1) + 1
    for d in range(r, max(2, r // 2) - 1, -1):
        if L % d == 0:
            return d
    return r


def diagonal_scan(
    a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None = None, *, dim: int = 0, method: str = "chunked"
) -> torch.Tensor:
    r"""All states of :math:`x_l = a_l x_{l-1} + b_l` (elementwise), :math:`x_{-1} = x_0` (default 0).

    Args:
        a, b: the factors and increments, broadcast against each other; the sequence is
            dimension ``dim`` (default 0, the fastest layout: each pass then reads contiguous
            slabs; another ``dim`` is moved there and back).
        x0: the state before the first element; broadcasts against one element of ``b``.
        method: ``"chunked"`` (default): the sequence is cut into chunks of
            :math:`\lceil\sqrt L\rceil`; the recurrence runs inside all chunks at once from a zero
            start (keeping each chunk's running product of ``a``), then the state entering each
            chunk is carried across the chunks and added back: :math:`O(L)` work in about
            :math:`2\sqrt L` vectorised passes. ``"log_depth"``: a Hillis–Steele scan with the
            associative operator :math:`(a, b)\circ(a', b') = (a a', a' b + b')`:
            :math:`\lceil\log_2 L\rceil` passes but :math:`O(L\log L)` work and memory traffic
            (slower on CPU; for wide accelerators and long sequences).

    Both methods only multiply factors together (no division by cumulative products, which
    underflow for fast modes), so with :math:`|a_l| \le 1` nothing overflows.

    Returns:
        The states, shaped like the broadcast of ``a`` and ``b``.
    """
    if method not in ("chunked", "log_depth"):
        raise ValueError(f"diagonal_scan(method=...) must be 'chunked' or 'log_depth', got {method!r}")
    a, b = torch.broadcast_tensors(a, b)
    if dim != 0:
        x = diagonal_scan(a.movedim(dim, 0), b.movedim(dim, 0), x0, method=method)
        return x.movedim(0, dim)
    L = b.shape[0]
    if L == 0:
        return b
    if method == "log_depth":
        if x0 is not None:
            b = torch.cat([torch.addcmul(b[:1], a[:1], x0.unsqueeze(0)), b[1:]])
        s = 1
        while s < L:
            b = torch.cat([b[:s], torch.addcmul(b[s:], a[s:], b[:-s])])
            if 2 * s < L:  # the last pass needs no new products of a
                a = torch.cat([a[:s], a[s:] * a[:-s]])
            s *= 2
        return b
    rest = b.shape[1:]
    C = _chunk_size(L)
    K = L // C
    full = K * C
    # unbind, not repeated indexing: one backward node for all slices (indexing would make
    # every slice's backward fill a zero tensor the size of the whole input)
    af = a[:full].reshape(K, C, *rest).unbind(1)
    bf = b[:full].reshape(K, C, *rest).unbind(1)
    xs, ps = [bf[0]], [af[0]]
    for i in range(1, C):  # inside every chunk at once, from a zero start
        xs.append(torch.addcmul(bf[i], af[i], xs[-1]))
        ps.append(ps[-1] * af[i])
    x_end, p_end = xs[-1].unbind(0), ps[-1].unbind(0)  # K slices of shape rest
    carry = torch.zeros_like(x_end[0]) if x0 is None else torch.broadcast_to(x0, x_end[0].shape)
    carries = [carry]
    for k in range(K):  # the state entering each chunk (and, last, leaving the final one)
        carries.append(torch.addcmul(x_end[k], p_end[k], carries[-1]))
    x = torch.addcmul(torch.stack(xs, 1), torch.stack(ps, 1), torch.stack(carries[:-1])[:, None])
    x = x.reshape(full, *rest)
    if full == L:
        return x
    tail, last = [], carries[-1]
    for a_i, b_i in zip(a[full:].unbind(0), b[full:].unbind(0)):  # fewer than C leftover steps
        last = torch.addcmul(b_i, a_i, last)
        tail.append(last)
    return torch.cat([x, torch.stack(tail)])


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _check_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}({name}=...) must be a positive int, got {value!r}")
    return int(value)


def _check_options(owner: str, init, discretisation, dt_min, dt_max):
    if init not in _INITS:
        raise ValueError(f"{owner}(init=...) must be one of {_INITS}, got {init!r}")
    if discretisation not in _METHODS:
        raise ValueError(f"{owner}(discretisation=...) must be one of {_METHODS}, got {discretisation!r}")
    if not (isinstance(dt_min, numbers.Real) and isinstance(dt_max, numbers.Real) and 0 < dt_min <= dt_max):
        raise ValueError(f"{owner} needs 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")


def _legs_normal_eig(n_modes: int):
    r"""Eigenvalues (with positive imaginary part, ascending) and eigenvectors of the normal part
    :math:`A + PP^\top = -\tfrac12 I + S` of HiPPO-LegS of size ``2 n_modes``
    (:math:`P_n = \sqrt{n + 1/2}`, ``S`` skew-symmetric); ``eigh`` of the Hermitian
    :math:`-iS` keeps the eigenvectors unitary. Returns ``(lam, V, B)`` with ``B`` = LegS's ``B``."""
    A, B = hippo_legs(2 * n_modes, dtype=torch.float64)
    p = torch.sqrt(torch.arange(2 * n_modes, dtype=torch.float64) + 0.5)
    S = A + p[:, None] * p[None, :] + 0.5 * torch.eye(2 * n_modes, dtype=torch.float64)
    w, V = torch.linalg.eigh(-1j * S.to(torch.complex128))
    keep = w > 0
    w, V = w[keep], V[:, keep]
    return torch.complex(torch.full_like(w, -0.5), w), V, B


def _init_modes(init: str, n_modes: int) -> torch.Tensor:
    """The ``n_modes`` complex eigenvalues of an S4D initialisation (float64/complex128)."""
    n = torch.arange(n_modes, dtype=torch.float64)
    if init == "lin":  # S4D-Lin: -1/2 + i pi n
        return torch.complex(torch.full_like(n, -0.5), math.pi * n)
    if init == "inv":  # S4D-Inv: -1/2 + i (N/pi) (N/(2n+1) - 1), N = 2 n_modes the real state size
        N = 2 * n_modes
        return torch.complex(torch.full_like(n, -0.5), N / math.pi * (N / (2 * n + 1) - 1))
    lam, _, _ = _legs_normal_eig(n_modes)
    return lam


class _DiagonalSSM(nn.Module):
    """What S4D and S5 share: the ``A`` parameterisation, the step sizes, input checks."""

    _owner = "SSM"

    def _A(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.log_A_real), self.A_imag)

    def _check_args(self, channels, state_size, init, discretisation, dt_min, dt_max, dtype):
        """Check the constructor's options, store them; returns ``(channels, state_size, dtype)``."""
        H = _check_positive_int(self._owner, "channels", channels)
        N = _check_positive_int(self._owner, "state_size", state_size)
        _check_options(self._owner, init, discretisation, dt_min, dt_max)
        self.channels, self.state_size, self.init, self.discretisation = H, N, init, discretisation
        return H, N, torch.get_default_dtype() if dtype is None else dtype

    def _init_parameters(self, lam, B0, C0, n_steps: int, dt_min, dt_max, dtype, device) -> None:
        """The parameters from float64/complex128 initial values: ``A`` from the eigenvalues
        ``lam``, ``B`` from complex ``B0``, ``C`` from ``C0`` (already a real view ``(..., 2)``),
        then (drawn in this order) ``D`` normal per channel and ``n_steps`` log step sizes
        uniform in ``[log dt_min, log dt_max]``."""
        fk = {"dtype": dtype, "device": device}
        self.log_A_real = nn.Parameter(torch.log(-lam.real).to(**fk).clone())
        self.A_imag = nn.Parameter(lam.imag.to(**fk).clone())
        self.B = nn.Parameter(torch.view_as_real(B0).to(**fk).clone())
        self.C = nn.Parameter(C0.to(**fk).clone())
        self.D = nn.Parameter(torch.randn(self.channels, dtype=torch.float64).to(**fk))
        u = torch.rand(n_steps, dtype=torch.float64)
        self.log_dt = nn.Parameter((math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))).to(**fk))

    def _check_u(self, u: torch.Tensor, channels: int) -> None:
        if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != channels:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"{self._owner} expects u of shape (batch, length, {channels}), got {got}")
        if u.is_complex() or not u.is_floating_point():
            raise TypeError(f"{self._owner} expects a real floating-point u, got {u.dtype}")

    def _check_dt(self, dt, u: torch.Tensor) -> torch.Tensor:
        """``dt`` as a ``(batch, length)`` tensor in ``u``'s dtype, checked non-negative and finite."""
        B, L = u.shape[:2]
        if isinstance(dt, numbers.Real) and not isinstance(dt, bool):
            dt = torch.full((B, L), float(dt), dtype=u.dtype, device=u.device)
        if not isinstance(dt, torch.Tensor):
            raise TypeError(
                f"{self._owner}(dt=...) must be a number or a (batch, length) tensor, got {type(dt).__name__}"
            )
        if dt.dim() == 3 and dt.shape[-1] == 1:
            dt = dt.squeeze(-1)
        if dt.dim() == 1 and dt.shape[0] == L:
            dt = dt.expand(B, L)
        if tuple(dt.shape) != (B, L):
            raise ValueError(
                f"{self._owner}(dt=...) must have shape (batch, length) = ({B}, {L}) (or (length,) shared "
                f"by the batch), got {tuple(dt.shape)}"
            )
        dt = dt.to(dtype=u.dtype, device=u.device)
        bad = ~(torch.isfinite(dt) & (dt >= 0))
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            raise ValueError(
                f"{self._owner}(dt=...) must be finite and >= 0 (time steps between observations); "
                f"got {dt[tuple(idx)].item()} at (sample, step) = {tuple(idx)}"
            )
        return dt

    def _check_state(self, state, shape, dtype, device):
        if state is None:
            return None
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != tuple(shape) or not state.is_complex():
            got = (tuple(state.shape), state.dtype) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"{self._owner} state must be a complex tensor of shape {tuple(shape)}, got {got}")
        return state.to(dtype=dtype, device=device)


class S4D(_DiagonalSSM):
    r"""S4D (Gu et al. 2022): ``channels`` independent single-input single-output diagonal state
    spaces, :math:`\dot x_h = A_h x_h + B_h u_h`, :math:`y_h = 2\,\mathrm{Re}(C_h x_h) + D_h u_h`.

    Each channel ``h`` has ``state_size`` complex modes (a real state of size ``2 * state_size``:
    the conjugate modes are implied), its own ``A`` (:math:`-e^{a} + i\omega`: the real part
    stays negative), ``B``, ``C``, ``D`` and a learned step :math:`\Delta_h = e^{\log\Delta_h}`
    (initialised log-uniform in ``[dt_min, dt_max]``).

    Initialisations of ``A`` (``init``): ``"legs"`` (S4D-LegS: the eigenvalues of the normal part
    of HiPPO-LegS, with ``B`` the LegS ``B`` in its eigenbasis), ``"inv"`` (S4D-Inv:
    :math:`-\frac12 + i\frac{N}{\pi}(\frac{N}{2n+1} - 1)`) and ``"lin"`` (S4D-Lin:
    :math:`-\frac12 + i\pi n`), with ``B = 1`` for the last two and ``C`` complex normal.

    **Modes** (one parameterisation, the same numbers; see the module docstring):

    * ``forward(u)``: a regular grid with the learned steps; by the convolution kernel and an
      FFT (``mode="convolution"``, the default) or by the scan (``mode="scan"``).
    * ``forward(u, dt)``: an irregular grid. ``dt[b, l] >= 0`` is the time from observation
      ``l - 1`` to observation ``l`` of sample ``b`` (``dt[b, 0]``: from the zero initial state
      to the first observation), in units of the regular grid: the step of channel ``h`` is
      :math:`\Delta_h\,dt_{b,l}`, and ``dt = 1`` everywhere is the regular grid. The input is
      held at :math:`u_l` over :math:`(t_{l-1}, t_l]`; with ``discretisation="zoh"`` the states are
      the exact solution of the ODE for that input. A ``dt`` of 0 leaves the state unchanged.
    * ``step(u_t, state, dt=None)``: one step of the recurrence (online inference).

    Args:
        channels: ``H``, the number of input (= output) channels.
        state_size: ``N``, the number of complex modes per channel (default 32).
        init: ``"legs"``, ``"inv"`` or ``"lin"``.
        dt_min, dt_max: the range of the initial steps.
        discretisation: ``"zoh"`` (default) or ``"bilinear"``.
        dtype, device: of the parameters (default: PyTorch's default dtype, CPU).

    Shapes: ``u`` is ``(batch, length, channels)``, real; ``y`` has the same shape. The state
    of :meth:`step` is a complex ``(batch, channels, state_size)`` tensor.

    Example:
        >>> import torch
        >>> from torchnde.nn import S4D
        >>> layer = S4D(channels=4, state_size=16)
        >>> u = torch.randn(8, 100, 4)
        >>> layer(u).shape                                   # convolution mode
        torch.Size([8, 100, 4])
        >>> dt = torch.rand(8, 100) * 2                      # irregular: per sample, per step
        >>> layer(u, dt).shape
        torch.Size([8, 100, 4])
    """

    _owner = "S4D"

    def __init__(
        self,
        channels: int,
        state_size: int = 32,
        *,
        init: str = "legs",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        discretisation: str = "zoh",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        H, N, dtype = self._check_args(channels, state_size, init, discretisation, dt_min, dt_max, dtype)
        if init == "legs":
            lam, V, B_legs = _legs_normal_eig(N)
            B0 = (V.conj().T @ B_legs.to(torch.complex128)).expand(H, N)
        else:
            lam = _init_modes(init, N)
            B0 = torch.ones(H, N, dtype=torch.complex128)
        C0 = torch.randn(H, N, 2, dtype=torch.float64) * math.sqrt(0.5)
        self._init_parameters(lam.expand(H, N), B0, C0, H, dt_min, dt_max, dtype, device)

    def _BC(self):
        return torch.view_as_complex(self.B), torch.view_as_complex(self.C)

    def kernel(self, length: int) -> torch.Tensor:
        """The convolution kernel ``K`` of shape ``(channels, length)`` on the regular grid:
        :math:`y_l = \\sum_{m=0}^{l} K_m u_{l-m} + D u_l`."""
        length = _check_positive_int("S4D.kernel", "length", length)
        A = self._A()
        B, C = self._BC()
        Abar, gamma = discretise_diagonal(A, torch.exp(self.log_dt)[:, None], self.discretisation)
        CB = C * B * gamma  # (H, N)
        m = torch.arange(length, dtype=self.log_dt.dtype, device=self.log_dt.device)
        if self.discretisation == "zoh":
            powers = torch.exp((torch.exp(self.log_dt)[:, None] * A)[..., None] * m)  # (H, N, L)
        else:
            powers = torch.exp(torch.log(Abar)[..., None] * m)
        return 2 * torch.einsum("hn,hnl->hl", CB, powers).real

    def initial_state(self, batch: int) -> torch.Tensor:
        """The zero state, complex ``(batch, channels, state_size)``."""
        p = self.log_dt
        return torch.zeros(batch, self.channels, self.state_size, dtype=_complex_of(p.dtype), device=p.device)

    def forward(
        self,
        u: torch.Tensor,
        dt=None,
        *,
        state: torch.Tensor | None = None,
        mode: str | None = None,
        return_state: bool = False,
    ):
        """Run the layer over a sequence.

        Args:
            u: ``(batch, length, channels)`` real inputs.
            dt: ``None`` (regular grid), a number, or ``(batch, length)`` (or ``(length,)``)
                non-negative time steps (irregular grid; see the class docstring).
            state: the complex ``(batch, channels, state_size)`` state before the first input
                (default zero); forces the scan.
            mode: ``"convolution"`` or ``"scan"``; default: convolution on a regular grid with
                no ``state``, the scan otherwise. ``"convolution"`` with ``dt`` or ``state``
                raises ``ValueError``.
            return_state: also return the state after the last input.

        Returns:
            ``y`` of shape ``(batch, length, channels)``, or ``(y, state)``.
        """
        self._check_u(u, self.channels)
        if mode not in (None, "convolution", "scan"):
            raise ValueError(f"S4D(mode=...) must be 'convolution', 'scan' or None, got {mode!r}")
        if mode == "convolution" and (dt is not None or state is not None or return_state):
            raise ValueError(
                "S4D mode='convolution' works on the regular grid from a zero state only; "
                "drop dt/state/return_state or use mode='scan'"
            )
        batch, L, H = u.shape
        cdtype = _complex_of(u.dtype)
        state = self._check_state(state, (batch, H, self.state_size), cdtype, u.device)
        use_conv = mode == "convolution" or (mode is None and dt is None and state is None and not return_state)
        if use_conv:
            K = self.kernel(L).to(u.dtype)  # (H, L)
            uf = u.transpose(1, 2)  # (batch, H, L)
            n = 2 * L
            y = torch.fft.irfft(torch.fft.rfft(uf, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]
            return (y + self.D.to(u.dtype)[:, None] * uf).transpose(1, 2)
        step = torch.exp(self.log_dt).to(u.dtype)  # (H,)
        # sequence first, (L, batch, H, N): the scan then reads contiguous slabs
        if dt is None:
            delta = step[None, None, :]
        else:
            delta = self._check_dt(dt, u).T[:, :, None] * step  # (L, batch, H)
        A = self._A().to(cdtype)
        B, C = (x.to(cdtype) for x in self._BC())
        Abar, gamma = discretise_diagonal(A, delta[..., None], self.discretisation)
        if return_state:
            b = (gamma * B) * u.transpose(0, 1)[..., None]  # (L, batch, H, N)
            xs = diagonal_scan(Abar, b, state)
            y = 2 * torch.einsum("hn,lbhn->blh", C, xs).real + self.D.to(u.dtype) * u
            return y, xs[-1]
        # the scan of C * x (same recurrence, C folded into the inputs): the output is then a
        # plain sum over the modes, one pass fewer over the (L, batch, H, N) states
        b = (gamma * (C * B)) * u.transpose(0, 1)[..., None]
        xs = diagonal_scan(Abar, b, None if state is None else C * state)
        return 2 * xs.sum(-1).real.transpose(0, 1) + self.D.to(u.dtype) * u

    def step(self, u_t: torch.Tensor, state: torch.Tensor, dt=None):
        """One step of the recurrence.

        Args:
            u_t: ``(batch, channels)`` input at the new time.
            state: complex ``(batch, channels, state_size)`` (e.g. :meth:`initial_state`).
            dt: ``None`` (the learned step), a number, or ``(batch,)`` steps (>= 0).

        Returns:
            ``(y_t, new_state)`` with ``y_t`` of shape ``(batch, channels)``.
        """
        if not isinstance(u_t, torch.Tensor) or u_t.dim() != 2:
            got = tuple(u_t.shape) if isinstance(u_t, torch.Tensor) else type(u_t).__name__
            raise ValueError(f"S4D.step expects u_t of shape (batch, {self.channels}), got {got}")
        d = None if dt is None else (dt[:, None] if isinstance(dt, torch.Tensor) and dt.dim() == 1 else dt)
        y, new = self.forward(u_t[:, None, :], d, state=state, mode="scan", return_state=True)
        return y[:, 0], new

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, state_size={self.state_size}, init={self.init!r}, "
            f"discretisation={self.discretisation!r}"
        )


class S5(_DiagonalSSM):
    r"""An S5-style layer (Smith et al. 2023): one multi-input multi-output diagonal state space
    shared by all channels, :math:`\dot x = \Lambda x + \tilde B u`,
    :math:`y = 2\,\mathrm{Re}(\tilde C x) + D \odot u`, with ``state_size`` complex modes
    (conjugate pairs implied), a learned step per mode and the same discretisation and scan as
    :class:`S4D`. Always computed by the scan (S5 has no per-channel convolution kernel).

    ``init="legs"`` (default) is S5's HiPPO-N initialisation: :math:`\Lambda` the eigenvalues of
    the normal part of HiPPO-LegS (size ``2 * state_size``), :math:`\tilde B = V^{*}B` for a
    random real ``B`` (LeCun normal) and complex normal :math:`\tilde C`; ``"inv"``/``"lin"``
    use the S4D eigenvalues with complex normal :math:`\tilde B`.

    ``forward(u, dt=None)`` takes ``u`` of shape ``(batch, length, channels)`` and ``dt`` as for
    :class:`S4D` (``(batch, length)``, times in units of the regular grid); the step of mode
    ``p`` is :math:`\Delta_p\,dt_{b,l}`. :meth:`step` advances one input.
    """

    _owner = "S5"

    def __init__(
        self,
        channels: int,
        state_size: int = 32,
        *,
        init: str = "legs",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        discretisation: str = "zoh",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        H, P, dtype = self._check_args(channels, state_size, init, discretisation, dt_min, dt_max, dtype)
        if init == "legs":
            lam, V, _ = _legs_normal_eig(P)
            B_real = torch.randn(2 * P, H, dtype=torch.float64) / math.sqrt(H)
            B0 = V.conj().T @ B_real.to(torch.complex128)  # (P, H)
        else:
            lam = _init_modes(init, P)
            B0 = torch.complex(torch.randn(P, H, dtype=torch.float64), torch.randn(P, H, dtype=torch.float64))
            B0 = B0 / math.sqrt(2 * H)
        C0 = torch.complex(torch.randn(H, P, dtype=torch.float64), torch.randn(H, P, dtype=torch.float64))
        C0 = C0 / math.sqrt(2 * P)
        self._init_parameters(lam, B0, torch.view_as_real(C0), P, dt_min, dt_max, dtype, device)

    def initial_state(self, batch: int) -> torch.Tensor:
        """The zero state, complex ``(batch, state_size)``."""
        p = self.log_dt
        return torch.zeros(batch, self.state_size, dtype=_complex_of(p.dtype), device=p.device)

    def forward(self, u: torch.Tensor, dt=None, *, state: torch.Tensor | None = None, return_state: bool = False):
        """Run the layer over ``u`` (``(batch, length, channels)``); ``dt`` and ``state`` as for
        :meth:`S4D.forward` (the state here is complex ``(batch, state_size)``).

        Returns ``y`` (``(batch, length, channels)``), or ``(y, state)`` with ``return_state``."""
        self._check_u(u, self.channels)
        batch, L, H = u.shape
        cdtype = _complex_of(u.dtype)
        state = self._check_state(state, (batch, self.state_size), cdtype, u.device)
        step = torch.exp(self.log_dt).to(u.dtype)  # (P,)
        if dt is None:
            delta = step[None, None, :]
        else:
            delta = self._check_dt(dt, u).T[:, :, None] * step  # (L, batch, P)
        A = self._A().to(cdtype)
        B, C = torch.view_as_complex(self.B).to(cdtype), torch.view_as_complex(self.C).to(cdtype)
        Abar, gamma = discretise_diagonal(A, delta, self.discretisation)
        Bu = torch.einsum("ph,blh->lbp", B, u.to(cdtype))  # (L, batch, P)
        xs = diagonal_scan(Abar, gamma * Bu, state)
        y = 2 * torch.einsum("hp,lbp->blh", C, xs).real + self.D.to(u.dtype) * u
        return (y, xs[-1]) if return_state else y

    def step(self, u_t: torch.Tensor, state: torch.Tensor, dt=None):
        """One step: ``u_t`` ``(batch, channels)``, complex ``state`` ``(batch, state_size)``,
        ``dt`` ``None``, a number or ``(batch,)``. Returns ``(y_t, new_state)``."""
        if not isinstance(u_t, torch.Tensor) or u_t.dim() != 2:
            got = tuple(u_t.shape) if isinstance(u_t, torch.Tensor) else type(u_t).__name__
            raise ValueError(f"S5.step expects u_t of shape (batch, {self.channels}), got {got}")
        d = None if dt is None else (dt[:, None] if isinstance(dt, torch.Tensor) and dt.dim() == 1 else dt)
        y, new = self.forward(u_t[:, None, :], d, state=state, return_state=True)
        return y[:, 0], new

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, state_size={self.state_size}, init={self.init!r}, "
            f"discretisation={self.discretisation!r}"
        )
