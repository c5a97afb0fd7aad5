"""A library of reference initial value problems for testing and benchmarking the solvers.

The core is the non-stiff DETEST set, classes A to E (25 problems, all on ``x in [0, 20]``):

    T. E. Hull, W. H. Enright, B. M. Fellen and A. E. Sedgwick, "Comparing numerical methods
    for ordinary differential equations", SIAM J. Numer. Anal. 9(4), 603-637 (1972).

(also distributed, with the same definitions, as the test problems of W. H. Enright and
J. D. Pryce, "Two FORTRAN packages for assessing initial value methods", ACM TOMS 13(1), 1987).

* A: single equations (decay, a Riccati-type equation, y cos x, the logistic curve, a spiral);
* B: small systems (Volterra predator-prey, linear and nonlinear chemical reactions, a limit
  cycle, Euler's rigid body equations);
* C: moderate systems (radioactive decay chains, a discretised heat equation with 10 and 51
  points, the five outer planets about the Sun);
* D: the Kepler orbit with eccentricities 0.1, 0.3, 0.5, 0.7 and 0.9;
* E: second-order equations (a Bessel equation, van der Pol, a forced Duffing equation, and two
  equations of motion with drag).

To these are added three classics from Hairer, Nørsett & Wanner, *Solving Ordinary
Differential Equations I* (2nd ed., 1993): the Lorenz attractor, the Arenstorf orbit (one full
period of the periodic restricted three-body orbit) and the Pleiades (seven stars in the plane).

Every vector field is a torch function ``f(t, y, args)`` on a float tensor whose last dimension
is the state; it builds its constants from ``y`` (``y.new_tensor``) or from Python floats, so it
works for any floating dtype and device, and ``t`` may be a Python float or a tensor broadcast
against the leading dimensions of ``y``. ``numpy_rhs`` is the same field for SciPy.

:func:`reference` computes accurate reference values with SciPy's DOP853 at ``rtol=1e-13``;
some problems also carry a closed-form ``exact`` solution, used to check those references.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ODEProblem", "PROBLEMS", "DETEST", "reference"]

REFERENCE_RTOL = 1e-13
REFERENCE_ATOL = 1e-14


@dataclass(frozen=True, eq=False)
class ODEProblem:
    """An initial value problem ``y' = vector_field(t, y, args)``, ``y(t0) = y0``, on ``[t0, t1]``.

    Attributes:
        name: key in :data:`PROBLEMS`.
        vector_field: ``f(t, y, args)`` in torch (dtype/device-agnostic; ``args`` is ignored).
        y0: the initial value, a 1-D float64 tensor.
        t0, t1: the interval of integration.
        numpy_rhs: ``f(t, y)`` on numpy arrays (for SciPy); derived from ``vector_field`` when
            not given.
        exact: optional closed-form solution ``exact(t) -> ndarray`` (numpy, float64).
        description: one line saying what the problem is.
    """

    name: str
    vector_field: Callable
    y0: torch.Tensor
    t0: float
    t1: float
    numpy_rhs: Callable | None = None
    exact: Callable | None = None
    description: str = ""

    def __post_init__(self):
        if self.numpy_rhs is None:
            f = self.vector_field

            def numpy_rhs(t, y):
                return f(float(t), torch.from_numpy(np.asarray(y, dtype=np.float64)), None).numpy()

            object.__setattr__(self, "numpy_rhs", numpy_rhs)

    @property
    def dim(self) -> int:
        return self.y0.shape[-1]

    def __repr__(self):
        return f"ODEProblem({self.name!r}, dim={self.dim}, t=[{self.t0}, {self.t1}])"


# --------------------------------------------------------------------------------------------
# helpers: componentwise access keeps every field valid for batched states (..., n)


def _sin(t):
    return torch.sin(t) if isinstance(t, torch.Tensor) else math.sin(t)


def _cos(t):
    return torch.cos(t) if isinstance(t, torch.Tensor) else math.cos(t)


def _stack(*cols):
    return torch.stack(cols, dim=-1)


def _vec(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _unit(n: int) -> torch.Tensor:
    y0 = torch.zeros(n, dtype=torch.float64)
    y0[0] = 1.0
    return y0


def _linear_exact(matrix: np.ndarray, y0: torch.Tensor, t0: float = 0.0):
    """Closed-form solution ``expm(A (t - t0)) y0`` of a linear constant-coefficient system."""
    from scipy.linalg import expm

    y0n = y0.numpy().copy()
    return lambda t: expm(matrix * (float(t) - t0)) @ y0n


# --------------------------------------------------------------------------------------------
# class A: single equations


def _a1(t, y, args):
    return -y


def _a2(t, y, args):
    return -0.5 * y**3


def _a3(t, y, args):
    c = _cos(t)
    return y * (c.unsqueeze(-1) if isinstance(c, torch.Tensor) else c)


def _a4(t, y, args):
    return 0.25 * y * (1.0 - y / 20.0)


def _a5(t, y, args):
    if isinstance(t, torch.Tensor):
        t = t.unsqueeze(-1)
    return (y - t) / (y + t)


# --------------------------------------------------------------------------------------------
# class B: small systems


def _b1(t, y, args):
    y1, y2 = y[..., 0], y[..., 1]
    return _stack(2.0 * (y1 - y1 * y2), -(y2 - y1 * y2))


def _b2(t, y, args):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return _stack(-y1 + y2, y1 - 2.0 * y2 + y3, y2 - y3)


_B2_MATRIX = np.array([[-1.0, 1.0, 0.0], [1.0, -2.0, 1.0], [0.0, 1.0, -1.0]])


def _b3(t, y, args):
    y1, y2 = y[..., 0], y[..., 1]
    return _stack(-y1, y1 - y2 * y2, y2 * y2)


def _b4(t, y, args):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    r = torch.sqrt(y1 * y1 + y2 * y2)
    return _stack(-y2 - y1 * y3 / r, y1 - y2 * y3 / r, y1 / r)


def _b5(t, y, args):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return _stack(y2 * y3, -y1 * y3, -0.51 * y1 * y2)


# --------------------------------------------------------------------------------------------
# class C: moderate systems


def _c1(t, y, args):
    # y1' = -y1, yi' = y(i-1) - yi (i = 2..9), y10' = y9
    head = -y[..., :1]
    mid = y[..., :-2] - y[..., 1:-1]
    tail = y[..., -2:-1]
    return torch.cat([head, mid, tail], dim=-1)


def _c1_matrix(n: int = 10) -> np.ndarray:
    a = np.zeros((n, n))
    a[0, 0] = -1.0
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i] = 1.0, -1.0
    a[n - 1, n - 2] = 1.0
    return a


def _c2(t, y, args):
    # y1' = -y1, yi' = (i-1) y(i-1) - i yi (i = 2..9), y10' = 9 y9
    n = y.shape[-1]
    k = torch.arange(1, n - 1, dtype=y.dtype, device=y.device)  # 1..n-2: i - 1 for i = 2..n-1
    head = -y[..., :1]
    mid = k * y[..., :-2] - (k + 1.0) * y[..., 1:-1]
    tail = (n - 1.0) * y[..., -2:-1]
    return torch.cat([head, mid, tail], dim=-1)


def _c2_matrix(n: int = 10) -> np.ndarray:
    a = np.zeros((n, n))
    a[0, 0] = -1.0
    for i in range(1, n - 1):  # 0-based row i is equation i + 1
        a[i, i - 1], a[i, i] = float(i), -float(i + 1)
    a[n - 1, n - 2] = float(n - 1)
    return a


def _heat(t, y, args):
    # C3 (n = 10) and C4 (n = 51): y1' = -2 y1 + y2, yi' = y(i-1) - 2 yi + y(i+1), yn' = y(n-1) - 2 yn
    out = -2.0 * y
    out = torch.cat([out[..., :1], out[..., 1:] + y[..., :-1]], dim=-1)
    return torch.cat([out[..., :-1] + y[..., 1:], out[..., -1:]], dim=-1)


def _heat_matrix(n: int) -> np.ndarray:
    return -2.0 * np.eye(n) + np.eye(n, k=1) + np.eye(n, k=-1)


# C5: the five outer planets (Jupiter, Saturn, Uranus, Neptune, Pluto) about the Sun, which
# carries the mass of the inner planets. Units: astronomical units, solar masses, 100 days (so
# the gravitational constant is 2.95912208286 rather than 2.95912208286e-4 per day^2).
_C5_K2 = 2.95912208286
_C5_M0 = 1.00000597682
_C5_MASSES = (0.000954786104043, 0.000285583733151, 0.0000437273164546, 0.0000517759138449, 0.00000277777777778)
_C5_POSITIONS = (
    (3.42947415189, 3.35386959711, 1.35494901715),
    (6.64145542550, 5.97156957878, 2.18231499728),
    (11.2630437207, 14.6952576794, 6.27960525067),
    (-30.1552268759, 1.65699966404, 1.43785752721),
    (-21.1238353380, 28.4465098142, 15.3882659679),
)
_C5_VELOCITIES = (
    (-0.557160570446, 0.505696783289, 0.230578543901),
    (-0.415570776342, 0.365682722812, 0.169143213293),
    (-0.325325669158, 0.189706021964, 0.0877265322780),
    (-0.0240476254170, -0.287659532608, -0.117219543175),
    (-0.176860753121, -0.216393453025, -0.0148647893090),
)


def _c5(t, y, args):
    # state: the 15 heliocentric positions (planet-major, xyz), then the 15 velocities.
    # q_j'' = k2 ( -(m0 + m_j) q_j / r_j^3 + sum_{k != j} m_k [ (q_k - q_j) / d_jk^3 - q_k / r_k^3 ] )
    lead = y.shape[:-1]
    q = y[..., :15].reshape(*lead, 5, 3)
    v = y[..., 15:]
    m = y.new_tensor(_C5_MASSES)
    r3 = torch.linalg.vector_norm(q, dim=-1) ** 3  # (..., 5)
    diff = q.unsqueeze(-3) - q.unsqueeze(-2)  # [..., j, k, :] = q_k - q_j
    eye = torch.eye(5, dtype=y.dtype, device=y.device)
    d3 = torch.linalg.vector_norm(diff, dim=-1) ** 3 + eye  # the diagonal (k = j) has diff = 0
    mutual = ((m / d3).unsqueeze(-1) * diff).sum(-2)  # sum_k m_k (q_k - q_j) / d_jk^3
    indirect_k = (m / r3).unsqueeze(-1) * q  # m_k q_k / r_k^3
    indirect = indirect_k.sum(-2, keepdim=True) - indirect_k  # sum over k != j
    direct = ((_C5_M0 + m) / r3).unsqueeze(-1) * q
    acc = _C5_K2 * (-direct + mutual - indirect)
    return torch.cat([v, acc.reshape(*lead, 15)], dim=-1)


# --------------------------------------------------------------------------------------------
# class D: orbit equations y1'' = -y1 / r^3, y2'' = -y2 / r^3, state (y1, y2, y1', y2')


def _kepler(t, y, args):
    x1, x2 = y[..., 0], y[..., 1]
    r3 = (x1 * x1 + x2 * x2) ** 1.5
    return _stack(y[..., 2], y[..., 3], -x1 / r3, -x2 / r3)


def _kepler_y0(e: float) -> torch.Tensor:
    return _vec(1.0 - e, 0.0, 0.0, math.sqrt((1.0 + e) / (1.0 - e)))


def _kepler_exact(e: float):
    """The orbit starts at perihelion with semi-major axis 1 (period 2 pi): solve Kepler's
    equation E - e sin E = t by Newton's method."""

    def exact(t):
        t = float(t)
        big = t + e * math.sin(t)
        for _ in range(100):
            step = (big - e * math.sin(big) - t) / (1.0 - e * math.cos(big))
            big -= step
            if abs(step) < 1e-16:
                break
        c, s = math.cos(big), math.sin(big)
        w = math.sqrt(1.0 - e * e)
        den = 1.0 - e * c
        return np.array([c - e, w * s, -s / den, w * c / den])

    return exact


# --------------------------------------------------------------------------------------------
# class E: higher-order equations, as first-order systems (y, y')


def _e1(t, y, args):
    # y'' + y' / (x + 1) + (1 - 1/(4 (x+1)^2)) y = 0: Bessel's equation of order 1/2 in x + 1
    s = t + 1.0
    return _stack(y[..., 1], -(y[..., 1] / s + (1.0 - 0.25 / (s * s)) * y[..., 0]))


def _e1_exact(t):
    # y = J_{1/2}(x + 1) = sqrt(2 / (pi s)) sin s, s = x + 1
    s = float(t) + 1.0
    c = math.sqrt(2.0 / (math.pi * s))
    return np.array([c * math.sin(s), c * (math.cos(s) - math.sin(s) / (2.0 * s))])


def _e2(t, y, args):
    # van der Pol: y'' = (1 - y^2) y' - y
    return _stack(y[..., 1], (1.0 - y[..., 0] ** 2) * y[..., 1] - y[..., 0])


def _e3(t, y, args):
    # forced Duffing: y'' = y^3 / 6 - y + 2 sin(2.78535 x)
    return _stack(y[..., 1], y[..., 0] ** 3 / 6.0 - y[..., 0] + 2.0 * _sin(2.78535 * t))


def _e4(t, y, args):
    # y'' = 0.032 - 0.4 (y')^2
    return _stack(y[..., 1], 0.032 - 0.4 * y[..., 1] ** 2)


def _e5(t, y, args):
    # y'' = sqrt(1 + (y')^2) / (25 - x)
    return _stack(y[..., 1], torch.sqrt(1.0 + y[..., 1] ** 2) / (25.0 - t))


# --------------------------------------------------------------------------------------------
# Hairer, Nørsett & Wanner


def _lorenz(t, y, args):
    x, yy, z = y[..., 0], y[..., 1], y[..., 2]
    return _stack(10.0 * (yy - x), x * (28.0 - z) - yy, x * yy - (8.0 / 3.0) * z)


_ARENSTORF_MU = 0.012277471
_ARENSTORF_PERIOD = 17.0652165601579625588917206249
_ARENSTORF_V0 = -2.00158510637908252240537862224  # y2'(0) of the periodic orbit


def _arenstorf(t, y, args):
    # restricted three-body problem (Earth, Moon, satellite) in the rotating frame
    mu = _ARENSTORF_MU
    mup = 1.0 - mu
    y1, y2, v1, v2 = y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    d1 = ((y1 + mu) ** 2 + y2 * y2) ** 1.5
    d2 = ((y1 - mup) ** 2 + y2 * y2) ** 1.5
    a1 = y1 + 2.0 * v2 - mup * (y1 + mu) / d1 - mu * (y1 - mup) / d2
    a2 = y2 - 2.0 * v1 - mup * y2 / d1 - mu * y2 / d2
    return _stack(v1, v2, a1, a2)


def _pleiades(t, y, args):
    # seven stars in the plane, masses m_i = i, G = 1; state (x_1..7, y_1..7, x'_1..7, y'_1..7)
    p = torch.stack([y[..., 0:7], y[..., 7:14]], dim=-1)  # (..., 7, 2)
    m = torch.arange(1, 8, dtype=y.dtype, device=y.device)
    diff = p.unsqueeze(-3) - p.unsqueeze(-2)  # [..., i, j, :] = p_j - p_i
    eye = torch.eye(7, dtype=y.dtype, device=y.device)
    r3 = torch.linalg.vector_norm(diff, dim=-1) ** 3 + eye
    acc = ((m / r3).unsqueeze(-1) * diff).sum(-2)  # (..., 7, 2)
    return torch.cat([y[..., 14:28], acc[..., 0], acc[..., 1]], dim=-1)


_PLEIADES_Y0 = _vec(
    3, 3, -1, -3, 2, -2, 2,  # x
    3, -3, 2, 0, 0, -4, 4,  # y
    0, 0, 0, 0, 0, 1.75, -1.5,  # x'
    0, 0, 0, -1.25, 1, 0, 0,  # y'
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the registry


def _detest(name, f, y0, description, exact=None) -> ODEProblem:
    return ODEProblem(name, f, y0, 0.0, 20.0, exact=exact, description=description)


def _build() -> dict[str, ODEProblem]:
    c5_y0 = torch.cat([_vec(*sum(_C5_POSITIONS, ())), _vec(*sum(_C5_VELOCITIES, ()))])
    problems = [
        _detest("A1", _a1, _vec(1.0), "y' = -y (exponential decay)", lambda t: np.array([math.exp(-t)])),
        _detest("A2", _a2, _vec(1.0), "y' = -y^3/2", lambda t: np.array([1.0 / math.sqrt(t + 1.0)])),
        _detest("A3", _a3, _vec(1.0), "y' = y cos x", lambda t: np.array([math.exp(math.sin(t))])),
        _detest(
            "A4",
            _a4,
            _vec(1.0),
            "y' = y/4 (1 - y/20) (logistic curve)",
            lambda t: np.array([20.0 / (1.0 + 19.0 * math.exp(-t / 4.0))]),
        ),
        _detest("A5", _a5, _vec(4.0), "y' = (y - x)/(y + x) (spiral)"),
        _detest("B1", _b1, _vec(1.0, 3.0), "Volterra predator-prey"),
        _detest(
            "B2", _b2, _vec(2.0, 0.0, 1.0), "linear chemical reaction", _linear_exact(_B2_MATRIX, _vec(2.0, 0.0, 1.0))
        ),
        _detest("B3", _b3, _vec(1.0, 0.0, 0.0), "nonlinear chemical reaction"),
        _detest("B4", _b4, _vec(3.0, 0.0, 0.0), "limit cycle"),
        _detest("B5", _b5, _vec(0.0, 1.0, 1.0), "Euler's equations of a rigid body"),
        _detest("C1", _c1, _unit(10), "radioactive decay chain (10)", _linear_exact(_c1_matrix(), _unit(10))),
        _detest("C2", _c2, _unit(10), "decay chain with rates 1..9 (10)", _linear_exact(_c2_matrix(), _unit(10))),
        _detest("C3", _heat, _unit(10), "discretised heat equation (10)", _linear_exact(_heat_matrix(10), _unit(10))),
        _detest("C4", _heat, _unit(51), "discretised heat equation (51)", _linear_exact(_heat_matrix(51), _unit(51))),
        _detest("C5", _c5, c5_y0, "five outer planets about the Sun (30)"),
    ]
    for i, e in enumerate((0.1, 0.3, 0.5, 0.7, 0.9), start=1):
        problems.append(_detest(f"D{i}", _kepler, _kepler_y0(e), f"Kepler orbit, eccentricity {e}", _kepler_exact(e)))
    problems += [
        _detest("E1", _e1, _vec(*_e1_exact(0.0)), "Bessel equation of order 1/2", _e1_exact),
        _detest("E2", _e2, _vec(2.0, 0.0), "van der Pol oscillator"),
        _detest("E3", _e3, _vec(0.0, 0.0), "forced Duffing equation"),
        _detest("E4", _e4, _vec(30.0, 0.0), "y'' = 0.032 - 0.4 y'^2"),
        _detest("E5", _e5, _vec(0.0, 0.0), "y'' = sqrt(1 + y'^2)/(25 - x)"),
        # Lorenz (HNW I.16.17) from the initial value of HNW's LRNZ problem, which runs to 16;
        # [0, 2] keeps the chaotic error growth (Lyapunov exponent ~0.9) to a factor of a few,
        # so the error at t1 still reflects the tolerance.
        ODEProblem(
            "lorenz",
            _lorenz,
            _vec(-8.0, 8.0, 27.0),
            0.0,
            2.0,
            description="Lorenz attractor (sigma=10, rho=28, beta=8/3)",
        ),
        # one period of the periodic orbit: y(t1) = y0
        ODEProblem(
            "arenstorf",
            _arenstorf,
            _vec(0.994, 0.0, 0.0, _ARENSTORF_V0),
            0.0,
            _ARENSTORF_PERIOD,
            description="Arenstorf orbit, one period",
        ),
        ODEProblem("pleiades", _pleiades, _PLEIADES_Y0, 0.0, 3.0, description="Pleiades: 7 stars in the plane"),
    ]
    return {p.name: p for p in problems}


PROBLEMS: dict[str, ODEProblem] = _build()
DETEST: tuple[str, ...] = tuple(n for n in PROBLEMS if n[0] in "ABCDE" and n[1:].isdigit())


# --------------------------------------------------------------------------------------------
# reference solutions


def _as_times(ts) -> tuple[float, ...] | None:
    if ts is None:
        return None
    if isinstance(ts, torch.Tensor):
        ts = ts.detach().cpu().tolist()
    return tuple(float(t) for t in np.asarray(ts, dtype=np.float64).reshape(-1))


def _integrate_reference(problem: ODEProblem, ts: tuple[float, ...] | None) -> np.ndarray:
    from scipy.integrate import solve_ivp

    y = problem.y0.detach().cpu().numpy().astype(np.float64)
    t = problem.t0
    targets = (problem.t1,) if ts is None else ts
    out = []
    for target in targets:
        # integrate segment by segment so every requested time is a step end (no interpolation)
        if target != t:
            sol = solve_ivp(
                problem.numpy_rhs, (t, target), y, method="DOP853", rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL
            )
            if sol.status != 0:
                raise RuntimeError(f"reference solve of {problem.name} failed: {sol.message}")
            y, t = sol.y[:, -1], target
        out.append(y.copy())
    result = out[0] if ts is None else np.stack(out)
    result.setflags(write=False)
    return result


@functools.cache
def _cached_reference(name: str, ts: tuple[float, ...] | None) -> np.ndarray:
    return _integrate_reference(PROBLEMS[name], ts)


def reference(problem: ODEProblem | str, ts: Sequence[float] | np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """The solution at ``problem.t1`` (shape ``(n,)``), or at the times ``ts`` (shape ``(T, n)``;
    monotone from ``t0`` in the direction of integration), computed with SciPy's DOP853 at
    ``rtol=1e-13, atol=1e-14``. Memoised per problem name and times for the problems of
    :data:`PROBLEMS`; any other :class:`ODEProblem` is integrated afresh. Read-only array."""
    times = _as_times(ts)
    if isinstance(problem, str):
        return _cached_reference(problem, times)
    if PROBLEMS.get(problem.name) is problem:
        return _cached_reference(problem.name, times)
    return _integrate_reference(problem, times)


# --------------------------------------------------------------------------------------------
# stiff: Robertson's chemical kinetics (shared by the implicit-solver tests)


def rober(t, y, args):
    """Robertson's chemical kinetics, rate constants ``args`` (default 0.04, 3e7, 1e4); stiff."""
    k1, k2, k3 = (0.04, 3e7, 1e4) if args is None else args
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2], -1)


def rober_reference(t1, k=(0.04, 3e7, 1e4)):
    """Robertson from (1, 0, 0) to ``t1`` by SciPy's Radau at rtol 1e-12, atol 1e-16."""
    from scipy.integrate import solve_ivp

    k1, k2, k3 = k

    def f(t, y):
        return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2, k2 * y[1] ** 2]

    return solve_ivp(f, (0, t1), [1, 0, 0], method="Radau", rtol=1e-12, atol=1e-16).y[:, -1]


# --------------------------------------------------------------------------------------------
# stiff: Van der Pol with mu = 1e3 (MATLAB's vdp1000, Shampine & Reichelt 1997)

VDP_MU = 1e3


def vdp(t, y, args):
    """Van der Pol, ``y1' = y2``, ``y2' = mu (1 - y1^2) y2 - y1`` with ``mu = args`` (default 1e3).

    With ``t = mu tau`` and ``z2 = mu y2`` this is Hairer & Wanner's scaled VDPOL,
    ``z1' = z2``, ``z2' = ((1 - z1^2) z2 - z1) / eps`` with ``eps = 1 / mu^2 = 1e-6`` on
    ``tau in [0, 2]``: ``[0, 2000]`` here is about 1.24 periods (period ~ (3 - 2 ln 2) mu), with
    two relaxation jumps (near t = 807 and 1614). The form ``y2' = mu ((1 - y1^2) y2 - y1)``
    (eps = 1 / mu = 1e-3 in the scaled form) has period ~1.6 instead, so on ``[0, 2000]`` it would
    cross about 1240 periods and 2500 jumps: a different, far costlier problem whose end value is
    dominated by the accumulated phase error."""
    mu = VDP_MU if args is None else args
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, mu * (1 - y1 * y1) * y2 - y1], -1)


#: y(2000) of :func:`vdp` from y(0) = (2, 0): SciPy 1.x Radau with the analytic Jacobian at
#: rtol 1e-13, atol 1e-16 (335759 evaluations); at rtol 1e-12, atol 1e-14 it agrees to 4e-14
#: (y1) and 4e-17 (y2), and the scaled form (above) at rtol 1e-12 to 5e-14 and 1e-17 (computed
#: once offline, 2026-12-06).
VDP_REF_2000 = (1.7061677321704618, -0.00089280970102482)
