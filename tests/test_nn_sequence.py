"""torchnde.nn sequence layers: HiPPO matrices, S4D / S5, CfC / LTC, ODE-RNN."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from numpy.polynomial.laguerre import laggauss
from numpy.polynomial.legendre import leggauss, legval
from scipy.special import eval_laguerre

import torchnde as tn
from torchnde.nn import (
    LTC,
    ODERNN,
    S4D,
    S5,
    CfC,
    diagonal_scan,
    hippo_fout,
    hippo_lagt,
    hippo_legs,
    hippo_legt,
)

F64 = torch.float64
TIGHT = tn.PIDController(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- HiPPO
_XG, _WG = leggauss(60)


def _legendre(n, z):
    c = np.zeros(n + 1)
    c[n] = 1.0
    return legval(z, c)


def _window_legendre(f, lo, hi, N):
    """(1/(hi-lo)) int_lo^hi f(s) sqrt(2n+1) P_n(2(s-lo)/(hi-lo) - 1) ds, n < N, by Gauss-Legendre."""
    s = lo + (_XG + 1) / 2 * (hi - lo)
    return np.array([0.5 * np.sum(_WG * f(s) * math.sqrt(2 * n + 1) * _legendre(n, _XG)) for n in range(N)])


def _solve_linear(A, B, u, t0, t1, c0, scale_by_t=False):
    A, B = A.to(F64), B.to(F64)

    def vf(t, c, args):
        d = c @ A.T + B * u(t)
        return d / t if scale_by_t else d

    sol = tn.solve(tn.ODETerm(vf), tn.Tsit5(), t0, t1, torch.as_tensor(c0, dtype=F64), controller=TIGHT)
    return sol.ys[-1].numpy()


def test_hippo_legs_reproduces_legendre_projection():
    """t c' = A c + B u holds for c_n(t) = (1/t) int_0^t u sqrt(2n+1) P_n(2s/t - 1) ds: solving it
    from t = 0.5 to t = 2 gives the quadrature coefficients at t = 2."""
    N = 8
    f_np = lambda s: np.sin(3 * s) + np.cos(s**2)  # noqa: E731
    f_t = lambda t: torch.sin(3 * t) + torch.cos(t**2)  # noqa: E731
    A, B = hippo_legs(N, dtype=F64)
    c = _solve_linear(A, B, f_t, 0.5, 2.0, _window_legendre(f_np, 0.0, 0.5, N), scale_by_t=True)
    np.testing.assert_allclose(c, _window_legendre(f_np, 0.0, 2.0, N), atol=1e-6, rtol=0)
    assert np.abs(c - _window_legendre(f_np, 0.0, 2.0, N)).max() < 1e-8


def _fourier_coef(f, t, N):
    s = (_XG + 1) / 2

    def p(n):
        if n == 0:
            return np.ones_like(s)
        k = (n + 1) // 2
        return math.sqrt(2) * (np.cos(2 * math.pi * k * s) if n % 2 else np.sin(2 * math.pi * k * s))

    return np.array([0.5 * np.sum(_WG * f(t - 1 + s) * p(n)) for n in range(N)])


def _lagt_coef(f, t, N):
    x, w = laggauss(80)
    return np.array([np.sum(w * f(t - x) * eval_laguerre(n, x)) for n in range(N)])


@pytest.mark.parametrize("kind", ["legt", "lagt", "fout"])
def test_hippo_translated_measures_exact_cases(kind):
    """LegT: exact for polynomials of degree < N; LagT: exact for every input; FouT: exact for a
    1-periodic trigonometric polynomial in the basis."""
    N = 8
    if kind == "legt":
        theta = 1.5
        f = lambda s: 1 + s - 0.3 * s**3 + 0.1 * s**5  # noqa: E731
        A, B = hippo_legt(N, theta, dtype=F64)
        coef = lambda t: _window_legendre(f, t - theta, t, N)  # noqa: E731
    elif kind == "lagt":
        f = lambda s: np.exp(-0.2 * (s - 1) ** 2) if isinstance(s, np.ndarray) else torch.exp(-0.2 * (s - 1) ** 2)  # noqa: E731
        A, B = hippo_lagt(N, dtype=F64)
        coef = lambda t: _lagt_coef(f, t, N)  # noqa: E731
    else:

        def f(x):
            m = np if isinstance(x, np.ndarray) else torch
            return 1 + m.cos(2 * math.pi * x) + 0.5 * m.sin(4 * math.pi * x) - 0.2 * m.cos(6 * math.pi * x)

        A, B = hippo_fout(N, dtype=F64)
        coef = lambda t: _fourier_coef(f, t, N)  # noqa: E731
    c = _solve_linear(A, B, f, 0.5, 2.0, coef(0.5))
    np.testing.assert_allclose(c, coef(2.0), atol=1e-6, rtol=0)


def test_hippo_shapes_dtypes_and_errors():
    for fn in (hippo_legs, hippo_legt, hippo_lagt, hippo_fout):
        A, B = fn(5, dtype=torch.float32)
        assert A.shape == (5, 5) and B.shape == (5,) and A.dtype == B.dtype == torch.float32
        with pytest.raises(ValueError, match="positive int"):
            fn(0)
        with pytest.raises(TypeError, match="real floating dtype"):
            fn(3, dtype=torch.int64)
    A, B = hippo_legs(3, dtype=F64)
    assert torch.equal(torch.diag(A), -torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    assert torch.allclose(A[2, 0], -torch.tensor(math.sqrt(5.0), dtype=F64))
    with pytest.raises(ValueError, match="window length"):
        hippo_legt(3, theta=-1.0)


# ----------------------------------------------------------------------------- S4D / S5
def _dense(layer, h=None):
    """The full complex diagonal system (modes and their conjugates) of one S4D channel / S5."""
    A = layer._A().detach().numpy()
    B = torch.view_as_complex(layer.B).detach().numpy()
    C = torch.view_as_complex(layer.C).detach().numpy()
    if h is not None:
        A, B, C = A[h], B[h][:, None], C[h][None, :]
    else:
        B, C = B, C
    return np.concatenate([A, A.conj()]), np.concatenate([B, B.conj()]), np.concatenate([C, C.conj()], 1)


def _zoh_reference(A, B, C, D, u, deltas):
    """x_l = expm-based exact ZOH step (Van Loan block exponential), y_l = Re(C x_l) + D u_l."""
    n, m = B.shape
    x = np.zeros(n, complex)
    ys = []
    for ul, dl in zip(u, deltas):
        M = np.zeros((n + m, n + m), complex)
        M[:n, :n] = np.diag(A)
        M[:n, n:] = B
        E = scipy.linalg.expm(M * dl)
        x = E[:n, :n] @ x + E[:n, n:] @ ul
        ys.append((C @ x).real + D * ul)
    return np.array(ys)


@pytest.mark.parametrize("init", ["legs", "inv", "lin"])
def test_s4d_convolution_recurrence_and_expm_agree(init):
    torch.manual_seed(0)
    layer = S4D(2, 4, init=init, dt_min=0.05, dt_max=0.5, dtype=F64)
    u = torch.randn(2, 25, 2, dtype=F64)
    with torch.no_grad():
        y_conv = layer(u)
        y_scan = layer(u, mode="scan")
        state, y_step = layer.initial_state(2), []
        for ut in u.unbind(1):
            y_t, state = layer.step(ut, state)
            y_step.append(y_t)
        y_step = torch.stack(y_step, 1)
    torch.testing.assert_close(y_scan, y_conv, atol=1e-10, rtol=0)
    torch.testing.assert_close(y_step, y_conv, atol=1e-10, rtol=0)
    step = torch.exp(layer.log_dt).detach().numpy()
    D = layer.D.detach().numpy()
    for h in range(2):
        A, B, C = _dense(layer, h)
        ref = _zoh_reference(A, B, C, D[h], u[0, :, h : h + 1].numpy(), [step[h]] * 25)
        np.testing.assert_allclose(y_conv[0, :, h].numpy(), ref[:, 0], atol=1e-10, rtol=0)


def test_s4d_bilinear_modes_agree():
    torch.manual_seed(1)
    layer = S4D(3, 5, init="inv", discretisation="bilinear", dtype=F64)
    u = torch.randn(2, 17, 3, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(u, mode="scan"), layer(u), atol=1e-10, rtol=0)
        torch.testing.assert_close(layer(u, 1.0), layer(u), atol=1e-10, rtol=0)


def test_s4d_irregular_dt_is_exact_zoh_per_sample():
    """Per sample and per step dt: the states are the exact solution of x' = Ax + Bu with the
    input held at u_l over (t_{l-1}, t_l] (Van Loan expm reference); dt = 0 keeps the state."""
    torch.manual_seed(2)
    layer = S4D(2, 3, dt_min=0.05, dt_max=0.5, dtype=F64)
    u = torch.randn(3, 15, 2, dtype=F64)
    dt = torch.rand(3, 15, dtype=F64) * 3
    dt[1, 4] = 0.0
    with torch.no_grad():
        y, last = layer(u, dt, return_state=True)
        y_alone = layer(u[2:], dt[2:])
    torch.testing.assert_close(y_alone, y[2:], atol=1e-12, rtol=0)
    step = torch.exp(layer.log_dt).detach().numpy()
    D = layer.D.detach().numpy()
    for b in range(3):
        for h in range(2):
            A, B, C = _dense(layer, h)
            ref = _zoh_reference(A, B, C, D[h], u[b, :, h : h + 1].numpy(), step[h] * dt[b].numpy())
            np.testing.assert_allclose(y[b, :, h].numpy(), ref[:, 0], atol=1e-10, rtol=0)
    # continuing from the returned state = running the concatenation
    u2, dt2 = torch.randn(3, 4, 2, dtype=F64), torch.rand(3, 4, dtype=F64)
    with torch.no_grad():
        y_cont = layer(u2, dt2, state=last)
        y_all = layer(torch.cat([u, u2], 1), torch.cat([dt, dt2], 1))
    torch.testing.assert_close(y_cont, y_all[:, 15:], atol=1e-12, rtol=0)


def test_s5_irregular_is_exact_zoh_and_step_matches():
    torch.manual_seed(3)
    for init in ("legs", "lin"):
        layer = S5(3, 4, init=init, dt_min=0.05, dt_max=0.5, dtype=F64)
        u = torch.randn(2, 12, 3, dtype=F64)
        dt = torch.rand(2, 12, dtype=F64) * 2
        with torch.no_grad():
            y = layer(u, dt)
            state, y_step = layer.initial_state(2), []
            for ut, dtt in zip(u.unbind(1), dt.unbind(1)):
                y_t, state = layer.step(ut, state, dtt)
                y_step.append(y_t)
        torch.testing.assert_close(torch.stack(y_step, 1), y, atol=1e-12, rtol=0)
        A, B, C = _dense(layer)
        # S5 has one step per mode: a block-diagonal Delta, so scale A and B row-wise
        step = np.concatenate([torch.exp(layer.log_dt).detach().numpy()] * 2)
        D = layer.D.detach().numpy()
        for b in range(2):
            # x' = A x + B u with time in units of dt, per-mode step: rescale each mode
            ref = _zoh_reference(A * step, B * step[:, None], C, D, u[b].numpy(), dt[b].numpy())
            np.testing.assert_allclose(y[b].numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["chunked", "log_depth"])
@pytest.mark.parametrize("L", [1, 2, 7, 16, 23])
def test_diagonal_scan_matches_loop(method, L):
    g = torch.Generator().manual_seed(L)
    a = torch.complex(torch.rand(L, 2, 3, generator=g, dtype=F64), torch.rand(L, 2, 3, generator=g, dtype=F64)) * 0.7
    b = torch.randn(L, 2, 3, generator=g, dtype=torch.complex128)
    x0 = torch.randn(2, 3, generator=g, dtype=torch.complex128)
    x, ref = x0, []
    for al, bl in zip(a, b):
        x = al * x + bl
        ref.append(x)
    torch.testing.assert_close(diagonal_scan(a, b, x0, method=method), torch.stack(ref), atol=1e-13, rtol=0)
    moved = diagonal_scan(a.movedim(0, -1), b.movedim(0, -1), x0, dim=-1, method=method)
    torch.testing.assert_close(moved, torch.stack(ref).movedim(0, -1), atol=1e-13, rtol=0)


def _assert_grad_matches_central_difference(loss, p, what="", eps=1e-6):
    """``loss().backward()``, then the gradient of ``p[0]`` against a central difference."""
    loss().backward()
    with torch.no_grad():
        p[0] += eps
        up = loss()
        p[0] -= 2 * eps
        down = loss()
        p[0] += eps
    fd = ((up - down) / (2 * eps)).item()
    assert abs(p.grad[0].item() - fd) < 1e-6 * max(1.0, abs(fd)), what


def test_ssm_gradient_matches_finite_differences():
    torch.manual_seed(4)
    for layer in (S4D(2, 3, dtype=F64), S5(2, 3, dtype=F64)):
        u = torch.randn(2, 9, 2, dtype=F64)
        dt = torch.rand(2, 9, dtype=F64) * 2

        def loss(layer=layer, u=u, dt=dt):
            return layer(u, dt).square().sum()

        _assert_grad_matches_central_difference(loss, layer.log_dt, type(layer).__name__)
        assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in layer.parameters())


def test_ssm_errors():
    layer = S4D(3, 4)
    with pytest.raises(ValueError, match=r"u of shape \(batch, length, 3\)"):
        layer(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"u of shape"):
        layer(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r">= 0"):
        layer(torch.randn(2, 5, 3), -torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"finite"):
        layer(torch.randn(2, 5, 3), torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match=r"\(batch, length\) = \(2, 5\)"):
        layer(torch.randn(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="mode='scan'"):
        layer(torch.randn(2, 5, 3), torch.ones(2, 5), mode="convolution")
    with pytest.raises(ValueError, match="complex tensor of shape"):
        layer(torch.randn(2, 5, 3), state=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="init"):
        S4D(3, 4, init="legt")
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        S5(3, 4, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="channels"):
        S5(0, 4)
    with pytest.raises(TypeError, match="real floating-point"):
        S5(3, 4)(torch.ones(2, 5, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------- CfC / LTC / ODE-RNN
def _irregular_batch(B=3, L=6, n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, n, generator=g, dtype=F64)
    dt = 0.2 + 2 * torch.rand(B, L, generator=g, dtype=F64)
    return x, dt


def _tight_ltc(n, hidden, **kw):
    torch.manual_seed(6)
    return LTC(n, hidden, controller=TIGHT, **kw).double()


def test_cfc_pure_is_ltc_closed_form_where_exact():
    """With a state-independent conductance (no recurrent weights) and the input held over each
    step, the LTC is linear with constant coefficients per step: CfC(mode="pure") is its exact
    solution. With recurrent weights it is only an approximation."""
    ltc = _tight_ltc(3, 4)
    with torch.no_grad():
        ltc.conductance.weight[:, 3:] = 0.0
        ltc.w_tau_raw.fill_(0.3)
    cfc = CfC(3, 4, mode="pure").double()
    cfc.liquid.load_state_dict(ltc.state_dict())
    x, dt = _irregular_batch()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2] = mask[2, 5] = False
    h0 = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        hs_ltc, h_ltc = ltc(x, dt, mask=mask, h0=h0)
        hs_cfc, h_cfc = cfc(x, dt, mask=mask, h0=h0)
    torch.testing.assert_close(hs_cfc, hs_ltc, atol=1e-8, rtol=0)
    torch.testing.assert_close(h_cfc, h_ltc, atol=1e-8, rtol=0)
    with torch.no_grad():
        ltc.conductance.weight[:, 3:] = 1.0
        cfc.liquid.load_state_dict(ltc.state_dict())
        gap = (cfc(x, dt, h0=h0)[0] - ltc(x, dt, h0=h0)[0]).abs().max()
    assert gap > 1e-3


def test_ltc_implicit_solver_and_per_sample_spans():
    ltc = _tight_ltc(3, 4)
    x, dt = _irregular_batch(B=3, L=4)
    with torch.no_grad():
        hs, _ = ltc(x, dt)
        ltc_imp = LTC(3, 4, solver=tn.Kvaerno5(), controller=tn.PIDController(rtol=1e-8, atol=1e-10)).double()
        ltc_imp.load_state_dict(ltc.state_dict())
        hs_imp, _ = ltc_imp(x, dt)
        alone, _ = ltc(x[1:2], dt[1:2])
    torch.testing.assert_close(hs_imp, hs, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, hs[1:2], atol=1e-9, rtol=0)


@pytest.mark.parametrize("field", ["mlp", "gru"])
def test_odernn_shapes_masks_and_per_sample_time_spans(field):
    """Each sample its own observation times (a batched time span, where ncps' LTC/CfC crash:
    ncps issues #81/#82); a sample's answer does not depend on the rest of the batch; masked
    steps (padding) hold the state, so h_last is the state after the last real observation."""
    torch.manual_seed(7)
    rnn = ODERNN(3, 5, vector_field=field, width=8, controller=TIGHT).double()
    x, dt = _irregular_batch(B=3, L=5)
    ts = dt.cumsum(1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0: 3 observations, then padding
    mask[2, 1] = False  # sample 2: a missing observation
    with torch.no_grad():
        hs, h = rnn(x, ts=ts, mask=mask)
        hs0, h0 = rnn(x[:1, :3], ts=ts[:1, :3])
        hs2, _ = rnn(x[2:, [0, 2, 3, 4]], ts=ts[2:, [0, 2, 3, 4]])
        hs_dt, _ = rnn(x, torch.cat([torch.zeros(3, 1, dtype=F64), dt[:, 1:]], 1), mask=mask)
    assert hs.shape == (3, 5, 5) and h.shape == (3, 5)
    torch.testing.assert_close(h[0], h0[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(hs[0, 3:], h0.expand(2, 5), atol=1e-9, rtol=0)
    torch.testing.assert_close(hs[2, [0, 2, 3, 4]], hs2[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(hs[2, 1], hs[2, 0], atol=0, rtol=0)
    torch.testing.assert_close(hs_dt, hs, atol=1e-9, rtol=0)


def test_recurrent_gradients_match_finite_differences():
    torch.manual_seed(8)
    x, dt = _irregular_batch(B=2, L=4)
    models = [
        (CfC(3, 4, backbone_units=8).double(), lambda m: m.head_f.bias),
        (CfC(3, 4, mode="pure").double(), lambda m: m.liquid.A),
        (ODERNN(3, 4, width=8, solver=tn.RK4(), dt0=0.25).double(), lambda m: m.update.bias_hh),
        (LTC(3, 4, solver=tn.RK4(), dt0=0.25).double(), lambda m: m.A),
    ]
    for model, param in models:

        def loss(model=model):
            return model(x, dt)[0].square().sum()

        _assert_grad_matches_central_difference(loss, param(model), type(model).__name__)


def test_recurrent_errors():
    cfc, rnn = CfC(3, 4), ODERNN(3, 4)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"x of shape \(batch, length, 3\)"):
        cfc(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match=">= 0"):
        cfc(x, -torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-decreasing"):
        rnn(x, ts=torch.tensor([0.0, 1.0, 0.5, 2.0, 3.0]))
    with pytest.raises(ValueError, match="not both"):
        rnn(x, torch.ones(2, 5), ts=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask=.*\(2, 5\)"):
        cfc(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"h0=.*\(2, 4\)"):
        cfc(x, h0=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN/inf"):
        cfc(x, torch.full((2, 5), float("inf")))
    with pytest.raises(ValueError, match="mode"):
        CfC(3, 4, mode="no_gate")
    with pytest.raises(ValueError, match="vector_field"):
        ODERNN(3, 4, vector_field="lstm")
    with pytest.raises(TypeError, match=r"ODERNN needs a vector field whose forward takes \(t, y\)"):
        ODERNN(3, 4, vector_field=torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="solver instance"):
        LTC(3, 4, solver=tn.Tsit5)
    with pytest.raises(ValueError, match="dt0"):
        ODERNN(3, 4, solver=tn.RK4())
    with pytest.raises(ValueError, match="hidden_size"):
        LTC(3, 0)
