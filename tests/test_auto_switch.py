"""AutoSwitch: stiffness detection along explicit steps, switching to an implicit solver and
back, per sample, statistics, dense output and gradients."""

import math

import numpy as np
import pytest
import torch

import torchnde as tn
from problems import rober
from torchnde.solvers.auto_switch import AutoSwitch, stability_boundary

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def vdp(t, y, mu):
    """Van der Pol in Liénard form, x'' = mu (1 - x^2) x' - x: relaxation oscillations of period
    about 1.614 mu, jumps near t = 807, 1614, 2421 for mu = 1000."""
    if isinstance(mu, torch.Tensor) and mu.dim() == 1:
        mu = mu.unsqueeze(-1)[..., 0]
    y1, y2 = y[..., 0], y[..., 1]
    return torch.stack([y2, mu * (1 - y1**2) * y2 - y1], -1)


def _vdp_ref(mu, T, y0=(2.0, 0.0)):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
        (0, T),
        list(y0),
        method="Radau",
        rtol=1e-10,
        atol=1e-10,
    )
    return sol.y[:, -1], sol


class _Spy(AutoSwitch):
    """Keeps (t0, mode at the step start) of every step tried."""

    def step(self, term, t0, t1, y0, state):
        self.log.append((t0, state[0].clone()))
        return super().step(term, t0, t1, y0, state)


def _switch_times(log, row=0):
    """The step-start times where the mode changed (the steps tried after an accepted switch)."""
    out, prev = [], False
    for t0, mode in log:
        m = bool(mode[row])
        if m != prev:
            out.append(float(t0[row]) if isinstance(t0, torch.Tensor) else float(t0))
            prev = m
    return out


# --- construction -------------------------------------------------------------------------


def test_stability_boundaries():
    """The real stability boundaries from the tableaus (Hairer & Wanner II, IV.2: 3.3 for
    Dopri5)."""
    assert stability_boundary(tn.Dopri5.tableau) == pytest.approx(3.3066, abs=2e-3)
    assert stability_boundary(tn.Tsit5.tableau) == pytest.approx(3.507, abs=2e-3)
    assert AutoSwitch().boundary == pytest.approx(3.507, abs=2e-3)


def test_arguments_checked():
    with pytest.raises(TypeError, match="two stages at the same time"):
        AutoSwitch(tn.Bosh3())
    with pytest.raises(TypeError, match="explicit Runge-Kutta"):
        AutoSwitch(tn.Kvaerno5())
    with pytest.raises(TypeError, match="implicit solver"):
        AutoSwitch(tn.Tsit5(), tn.Dopri5())
    with pytest.raises(TypeError, match="instances"):
        AutoSwitch(tn.Tsit5, tn.Kvaerno5())
    with pytest.raises(ValueError, match="stiff_steps"):
        AutoSwitch(stiff_steps=0)
    with pytest.raises(ValueError, match="back_fraction"):
        AutoSwitch(back_fraction=-1.0)
    assert AutoSwitch() == AutoSwitch(tn.Tsit5(), tn.Kvaerno5())
    assert AutoSwitch() != AutoSwitch(tn.Dopri5())
    assert hash(AutoSwitch()) == hash(AutoSwitch())
    assert repr(AutoSwitch()) == "AutoSwitch(Tsit5(), Kvaerno5())"
    s = AutoSwitch()
    assert (s.order, s.error_order, s.dense_order) == (5, 4, 3)
    assert AutoSwitch(implicit=tn.Kvaerno3()).error_order == 2  # the smaller of the two


# --- non-stiff: the explicit solver alone -------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
def test_nonstiff_stays_explicit(per_sample):
    """Van der Pol with mu = 1: the same steps, evaluations and values as Tsit5 alone, no switch."""
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    y0 = y0 if per_sample else y0[0]
    kw = dict(args=1.0, controller=tn.PIDController(rtol=1e-6, atol=1e-6), per_sample=per_sample)
    kw["saveat"] = tn.SaveAt(ts=[1.0, 3.3, 10.0])
    a = tn.solve(tn.ODETerm(vdp), tn.Tsit5(), 0.0, 10.0, y0, **kw)
    b = tn.solve(tn.ODETerm(vdp), AutoSwitch(), 0.0, 10.0, y0, **kw)
    assert torch.equal(a.ys, b.ys)
    assert b.stats["nfe"] == a.stats["nfe"]
    for k in ("num_steps", "num_accepted", "num_rejected"):
        assert torch.equal(torch.as_tensor(a.stats[k]), torch.as_tensor(b.stats[k]))
    if per_sample:
        assert b.stats["num_switches"].tolist() == [0, 0] and b.stats["num_implicit_steps"].tolist() == [0, 0]
        assert (b.stats["stiffness"] < 1.0).all()
    else:
        assert b.stats["num_switches"] == 0 and b.stats["num_implicit_steps"] == 0
        assert 0 < b.stats["stiffness"] < 1.0


# --- stiff: switches, and far fewer steps than Tsit5 ---------------------------------------


@pytest.mark.parametrize("implicit", [tn.Kvaerno5, tn.Rodas5P], ids=lambda s: s.__name__)
def test_stiff_van_der_pol_switches(implicit):
    """Van der Pol, mu = 1000, on its slow branch (t in [0, 50]), rtol = atol = 1e-6: the solve
    switches once, within its first 0.1 time units, and needs about 30 steps (measured with either
    implicit solver: switch at t = 0.022, 33 steps, 29 accepted of which 8 implicit, ~220
    evaluations), where Tsit5 alone stops at max_steps = 500 before t = 1. Agrees with SciPy's
    Radau (rtol 1e-10) to 1e-5."""
    pytest.importorskip("scipy")
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)
    s = _Spy(implicit=implicit())
    s.log = []
    sol = tn.solve(tn.ODETerm(vdp), s, 0.0, 50.0, y0, args=1000.0, controller=ctrl)
    ref, _ = _vdp_ref(1000.0, 50.0)
    np.testing.assert_allclose(sol.ys[-1].numpy(), ref, rtol=1e-5, atol=1e-7)
    assert sol.stats["num_switches"] == 1
    assert 0 < sol.stats["num_implicit_steps"] < 20
    assert sol.stats["num_steps"] < 60
    assert sol.stats["stiffness"] > 100  # h rho of the last (implicit) step: far beyond Tsit5's 3.5
    (t_switch,) = _switch_times(s.log)
    assert t_switch < 0.1
    explicit = tn.solve(
        tn.ODETerm(vdp), tn.Tsit5(), 0.0, 50.0, y0, args=1000.0, controller=ctrl, max_steps=500, throw=False
    )
    assert explicit.result == tn.Result.max_steps_reached and explicit.t_final < 1.0


@pytest.mark.slow
def test_stiff_van_der_pol_long():
    """Van der Pol, mu = 1000, over [0, 3000] (three fast jumps), rtol = atol = 1e-6, float64.

    Measured (this machine, 1 thread): AutoSwitch(Tsit5, Kvaerno5) 808 steps, 535 accepted of
    which 255 implicit, 7 switches (to implicit at t = 0.022, back to explicit for each jump:
    t = 807.064 to 807.112, 1614.265 to 1614.313, 2421.465 to 2421.512), 10.3k evaluations, 3.1 s;
    Kvaerno5 alone 699 steps, 12.1k evaluations, 2.9 s; AutoSwitch(Tsit5, Rodas5P) 715 steps /
    5.3k evaluations / 1.2 s, Rodas5P alone 688 / 5.5k / 1.2 s; Tsit5 alone stops at max_steps
    (it would need about 3000 / (3.5 / 3000) ~ 2.6e6 steps). SciPy Radau at rtol 1e-10 takes 8.6k
    steps. Agreement with it: 1e-4 (relative)."""
    pytest.importorskip("scipy")
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)
    s = _Spy()
    s.log = []
    sol = tn.solve(tn.ODETerm(vdp), s, 0.0, 3000.0, y0, args=1000.0, controller=ctrl)
    ref, _ = _vdp_ref(1000.0, 3000.0)
    np.testing.assert_allclose(sol.ys[-1].numpy(), ref, rtol=1e-4, atol=1e-6)
    assert sol.stats["num_steps"] < 1200
    assert sol.stats["num_switches"] == 7
    times = _switch_times(s.log)
    assert times[0] < 0.1
    for jump, (back, again) in zip((807.0, 1614.2, 2421.4), zip(times[1::2], times[2::2])):
        assert jump < back < again < jump + 1.0
    explicit = tn.solve(
        tn.ODETerm(vdp), tn.Tsit5(), 0.0, 3000.0, y0, args=1000.0, controller=ctrl, max_steps=5000, throw=False
    )
    assert explicit.result == tn.Result.max_steps_reached


# --- per sample -----------------------------------------------------------------------------


def test_per_sample_mixed_batch():
    """mu = 1000 (stiff) and mu = 1 (not) in one per-sample batch over [0, 5]: each sample equals
    its own solve (values, dense output, steps, statistics) and only the stiff one switches."""
    mu = torch.tensor([1000.0, 1.0], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    kw = dict(
        controller=tn.PIDController(rtol=1e-6, atol=1e-6),
        saveat=tn.SaveAt(ts=[0.01, 1.0, 5.0], dense=True),
        per_sample=True,
    )
    both = tn.solve(tn.ODETerm(vdp), AutoSwitch(), 0.0, 5.0, y0, args=mu, **kw)
    assert (both.result == 0).all()
    assert both.stats["num_switches"].tolist() == [1, 0]
    assert both.stats["num_implicit_steps"][0] > 0 and both.stats["num_implicit_steps"][1] == 0
    tq = torch.tensor([0.005, 2.345], dtype=F64)
    for i in range(2):
        alone = tn.solve(tn.ODETerm(vdp), AutoSwitch(), 0.0, 5.0, y0[i : i + 1], args=mu[i : i + 1], **kw)
        torch.testing.assert_close(both.ys[i], alone.ys[0], atol=1e-10, rtol=0)
        for k in ("num_steps", "num_switches", "num_implicit_steps"):
            assert both.stats[k][i] == alone.stats[k][0], k
        for t in tq:
            torch.testing.assert_close(
                both.evaluate(t.expand(2))[i], alone.evaluate(t.expand(1))[0], atol=1e-10, rtol=0
            )
        shared = tn.solve(
            tn.ODETerm(vdp), AutoSwitch(), 0.0, 5.0, y0[i], args=mu[i], controller=kw["controller"],
            saveat=tn.SaveAt(ts=[0.01, 1.0, 5.0]),
        )  # fmt: skip
        torch.testing.assert_close(both.ys[i], shared.ys, atol=1e-10, rtol=0)
        assert shared.stats["num_switches"] == int(both.stats["num_switches"][i])


def test_per_sample_gradients_match_alone():
    """Gradients through a mixed batch (the rows the other solver made zero steps for get no
    gradient from it, and no NaN): each row's gradient equals that of its own solve."""
    mu = torch.tensor([1000.0, 1.0], dtype=F64)
    kw = dict(controller=tn.PIDController(rtol=1e-7, atol=1e-9), per_sample=True)

    def grad(y0, m):
        y0 = y0.clone().requires_grad_()
        sol = tn.solve(tn.ODETerm(vdp), AutoSwitch(), 0.0, 2.0, y0, args=m, **kw)
        (g,) = torch.autograd.grad((sol.ys[:, -1] ** 2).sum(), y0)
        return g, sol

    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    g, sol = grad(y0, mu)
    assert sol.stats["num_switches"].tolist() == [1, 0]
    assert torch.isfinite(g).all()
    for i in range(2):
        gi, _ = grad(y0[i : i + 1], mu[i : i + 1])
        torch.testing.assert_close(g[i], gi[0], atol=1e-10, rtol=1e-9)


# --- a problem that becomes stiff ----------------------------------------------------------


def ramp(t, y, a):
    """y' = -k(t) (y - sin t) + cos t, y(0) = 0: the solution is sin t, and the stiffness
    k(t) = 10^(t - 2) grows from 0.01 to 1e6 over [0, 8]."""
    k = 10.0 ** (t - 2.0)
    return -k * (y - math.sin(t)) + math.cos(t)


def test_becomes_stiff_midway():
    """rtol 1e-6, atol 1e-8. Tsit5's accepted steps become stability-limited (h k rises past 3.0
    of its 3.5) from about t = 4.9 (k = 800); AutoSwitch switches once, at t = 5.03 (measured,
    k = 1.1e3). Totals (measured): 306 steps, 2.9k evaluations, 62 of the 274 accepted steps
    implicit; Kvaerno5 alone 134 steps, 2.8k evaluations (its steps exceed Tsit5's stability
    limit from t = 3.7, k = 53: detection along the explicit steps is later than ideal here);
    Tsit5 alone reaches only t = 7.9 in 100k steps."""
    y0 = torch.tensor([0.0], dtype=F64)
    s = _Spy()
    s.log = []
    sol = tn.solve(
        tn.ODETerm(ramp), s, 0.0, 8.0, y0, controller=tn.PIDController(rtol=1e-6, atol=1e-8),
        saveat=tn.SaveAt(ts=[2.0, 5.0, 8.0]),
    )  # fmt: skip
    exact = torch.tensor([math.sin(2.0), math.sin(5.0), math.sin(8.0)], dtype=F64)
    torch.testing.assert_close(sol.ys[:, 0], exact, atol=1e-6, rtol=0)
    assert sol.stats["num_switches"] == 1
    (t_switch,) = _switch_times(s.log)
    assert 4.7 < t_switch < 5.3, t_switch
    assert sol.stats["num_steps"] < 500
    # the stiffness estimate is the exact h k on this scalar linear problem
    assert sol.stats["stiffness"] > 1e3


def test_switches_back_when_stiffness_fades():
    """y' = -k(t) (y - sin t) + cos t with k = 1e4 on [0, 1], then 0.1: stiff first, then not.
    The solve switches to Kvaerno5 early and back to Tsit5 once k has dropped (h k_J below half the
    boundary for 15 steps)."""

    def fade(t, y, a):
        k = 1e4 if t < 1.0 else 0.1
        return -k * (y - math.sin(t)) + math.cos(t)

    s = _Spy()
    s.log = []
    sol = tn.solve(
        tn.ODETerm(fade), s, 0.0, 20.0, torch.tensor([0.0], dtype=F64),
        controller=tn.PIDController(rtol=1e-6, atol=1e-8),
    )  # fmt: skip
    assert sol.stats["num_switches"] == 2, sol.stats
    t_in, t_out = _switch_times(s.log)
    assert t_in < 0.1 and 1.0 < t_out < 8.0
    assert abs(sol.ys[-1].item() - math.sin(20.0)) < 1e-5


# --- gradients ------------------------------------------------------------------------------


def _two(t, y, a):
    """A stiff linear component (rate k) coupled to a nonlinear non-stiff one."""
    k, c = a
    return torch.stack([-k * (y[0] - torch.cos(c * t)), -0.5 * y[1] + y[0] ** 2])


def test_gradient_through_switch_fixed_steps():
    """Constant steps with h k = 3.3 (inside Tsit5's stability boundary 3.51, above 0.9 of it):
    AutoSwitch(Tsit5, Rodas5P) switches after 15 explicit steps and finishes implicit.
    DirectAdjoint gradients w.r.t. k, c and y0 against central differences (float64; the switch
    does not move under the perturbations).

    (Not with Kvaerno5 here: with these constant steps its non-stiff component moves by up to 7e-4
    between solves whose k differs by 1e-6 relative, so central differences are noise; see
    test_gradient_adaptive_matches_implicit_alone for Kvaerno5.)"""
    solver = AutoSwitch(implicit=tn.Rodas5P())
    k0, n = 200.0, 40
    dt = 3.3 / k0

    def loss(k, c, y0):
        sol = tn.solve(tn.ODETerm(_two), solver, 0.0, n * dt, y0, args=(k, c), dt0=dt)
        return (sol.ys[-1] ** 2).sum() + sol.ys[-1][1], sol

    k = torch.tensor(k0, dtype=F64, requires_grad=True)
    c = torch.tensor(3.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.3, 1.0], dtype=F64, requires_grad=True)
    L, sol = loss(k, c, y0)
    assert sol.stats["num_switches"] == 1 and sol.stats["num_implicit_steps"] == n - 15
    gk, gc, gy = torch.autograd.grad(L, (k, c, y0))
    with torch.no_grad():
        d = 1e-6
        fd_k = (loss(k + d * k0, c, y0)[0] - loss(k - d * k0, c, y0)[0]) / (2 * d * k0)
        fd_c = (loss(k, c + d, y0)[0] - loss(k, c - d, y0)[0]) / (2 * d)
        e = torch.eye(2, dtype=F64) * d
        fd_y = torch.stack([(loss(k, c, y0 + e[i])[0] - loss(k, c, y0 - e[i])[0]) / (2 * d) for i in range(2)])
    assert gk.item() == pytest.approx(fd_k.item(), rel=1e-5, abs=1e-9)
    assert gc.item() == pytest.approx(fd_c.item(), rel=1e-6)
    torch.testing.assert_close(gy, fd_y, rtol=1e-6, atol=1e-9)


def test_gradient_adaptive_matches_implicit_alone():
    """Adaptive, rtol 1e-7: the gradient through a switching solve (Tsit5 -> Kvaerno5 at the
    start) agrees with Kvaerno5's alone to 1e-5 (both differentiate accurate solutions of the same
    problem; step sizes are constants for autograd)."""

    def grads(solver):
        k = torch.tensor(1e4, dtype=F64)
        c = torch.tensor(3.0, dtype=F64, requires_grad=True)
        y0 = torch.tensor([0.3, 1.0], dtype=F64, requires_grad=True)
        sol = tn.solve(
            tn.ODETerm(_two), solver, 0.0, 0.5, y0, args=(k, c), controller=tn.PIDController(rtol=1e-7, atol=1e-10)
        )
        return torch.autograd.grad((sol.ys[-1] ** 2).sum(), (c, y0)), sol

    (gc, gy), sol = grads(AutoSwitch())
    assert sol.stats["num_switches"] == 1
    (rc, ry), _ = grads(tn.Kvaerno5())
    assert gc.item() == pytest.approx(rc.item(), rel=1e-5)
    torch.testing.assert_close(gy, ry, rtol=1e-5, atol=1e-9)


# --- Robertson, direction of time, float32 --------------------------------------------------


def test_robertson():
    """Robertson to t = 1e4, rtol 1e-6, atol 1e-10: switches once, at t = 0.031 (measured), 78
    steps / 936 evaluations (Kvaerno5 alone 56 / 914); within 5e-6 (relative) of SciPy's Radau
    at rtol 1e-12. Tsit5 alone stops at max_steps = 500 before t = 10."""
    pytest.importorskip("scipy")
    from scipy.integrate import solve_ivp

    k1, k2, k3 = 0.04, 3e7, 1e4
    ref = solve_ivp(
        lambda t, y: [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2, k2 * y[1] ** 2],
        (0, 1e4), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-16,
    ).y[:, -1]  # fmt: skip
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-10)
    sol = tn.solve(tn.ODETerm(rober), AutoSwitch(), 0.0, 1e4, y0, controller=ctrl)
    np.testing.assert_allclose(sol.ys[-1].numpy(), ref, rtol=5e-6)
    assert sol.stats["num_switches"] == 1 and sol.stats["num_steps"] < 120
    explicit = tn.solve(tn.ODETerm(rober), tn.Tsit5(), 0.0, 1e4, y0, controller=ctrl, max_steps=500, throw=False)
    assert explicit.result == tn.Result.max_steps_reached and explicit.t_final < 10.0


def test_backward_in_time():
    """y' = 1000 (y - cos t) from t = 1 back to 0 (stiff and stable backwards), rtol 1e-6:
    switches, and agrees with Kvaerno5 alone. (At rtol 1e-7 it does not switch: Tsit5's error
    estimate holds its steps at h rho = 2.39, 0.68 of the stability boundary, below the
    detection threshold; see AutoSwitch's limitations.)"""

    def f(t, y, a):
        return 1000.0 * (y - math.cos(t))

    y1 = torch.tensor([math.cos(1.0) + 0.1], dtype=F64)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-8)
    sol = tn.solve(tn.ODETerm(f), AutoSwitch(), 1.0, 0.0, y1, controller=ctrl)
    ref = tn.solve(tn.ODETerm(f), tn.Kvaerno5(), 1.0, 0.0, y1, controller=ctrl)
    assert sol.stats["num_switches"] == 1
    torch.testing.assert_close(sol.ys[-1], ref.ys[-1], atol=1e-5, rtol=0)


def test_float32_module_per_sample():
    """A float32 nn.Module vector field with a per-sample stiff linear part (rate 1, 1000, 5,
    2000): the stiff samples switch, the state stays float32, the result agrees with Kvaerno5 and
    gradients reach the parameters."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    rate = torch.tensor([[1.0], [1000.0], [5.0], [2000.0]])

    def f(t, y, a):
        return net(y) - a * y

    y0 = torch.randn(4, 3)
    kw = dict(args=rate, controller=tn.PIDController(rtol=1e-4, atol=1e-6), per_sample=True)
    sol = tn.solve(tn.ODETerm(f), AutoSwitch(), 0.0, 1.0, y0, **kw)
    ref = tn.solve(tn.ODETerm(f), tn.Kvaerno5(), 0.0, 1.0, y0, **kw)
    assert sol.ys.dtype == torch.float32 and (sol.result == 0).all()
    assert sol.stats["num_switches"].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(sol.ys, ref.ys, atol=1e-4, rtol=0)
    (g,) = torch.autograd.grad(sol.ys.sum(), net[0].weight)
    assert torch.isfinite(g).all()


def test_terminal_event_through_switch():
    """A terminal event on the slow branch of Van der Pol (mu = 1000, x = 1.5) is located on the
    implicit steps' dense output: the same time as Kvaerno5 alone finds (to 1e-6 relative), shared
    and per sample (the non-stiff sample, mu = 1, stops at its own time without switching)."""
    ev = tn.Event(lambda t, y, a: y[..., 0] - 1.5, terminal=True)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    sol = tn.solve(tn.ODETerm(vdp), AutoSwitch(), 0.0, 3000.0, y0, args=1000.0, controller=ctrl, event=ev)
    ref = tn.solve(tn.ODETerm(vdp), tn.Kvaerno5(), 0.0, 3000.0, y0, args=1000.0, controller=ctrl, event=ev)
    assert sol.stats["num_switches"] == 1
    assert sol.t_final == pytest.approx(ref.t_final, rel=1e-6)
    batch = tn.solve(
        tn.ODETerm(vdp), AutoSwitch(), 0.0, 3000.0, y0.expand(2, 2).clone(),
        args=torch.tensor([1000.0, 1.0], dtype=F64), controller=ctrl, event=ev, per_sample=True,
    )  # fmt: skip
    assert batch.stats["num_switches"].tolist() == [1, 0]
    assert batch.t_final[0].item() == pytest.approx(sol.t_final, rel=1e-12)
    assert batch.t_final[1].item() < 2.0
