"""The fused fixed-step loop (torchnde/_fixed.py) gives the general loop's results bit for bit:
solutions, saved values, statistics, gradients, failures; with and without prefetched Brownian
increments."""

import math

import pytest
import torch

import torchnde as tn
import torchnde._solve as _solve_mod
from torchnde._fixed import FixedLoop, Prefetched, fusable
from torchnde.paths import BrownianGrid, VirtualBrownianTree


def _both(fn):
    """``fn()`` through the fused loop and through the general loop (fusing switched off)."""
    fused = fn()
    saved = _solve_mod.fusable
    _solve_mod.fusable = lambda p: False
    try:
        general = fn()
    finally:
        _solve_mod.fusable = saved
    return fused, general


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert (
            torch.equal(a, b)
            or (torch.isnan(a) == torch.isnan(b)).all()
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        ), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b, (a, b)


def _same_solution(s1, s2):
    _same(s1.ts, s2.ts)
    _same(s1.ys, s2.ys)
    _same(s1.stats, s2.stats)
    assert s1.result == s2.result


def _f(t, y, a):
    return torch.sin(t) * y + 0.3 * torch.cos(y)


@pytest.mark.parametrize(
    "solver, saveat, controller",
    [
        (tn.Euler(), tn.SaveAt(t1=True), None),
        (tn.RK4(), tn.SaveAt(ts=torch.linspace(0.0, 1.3, 7)), None),
        (tn.Heun(), tn.SaveAt(steps=True), None),
        (tn.Midpoint(), tn.SaveAt(dense=True), None),
        (tn.RK4(), tn.SaveAt(t0=True, t1=True), tn.StepTo([0.0, 0.2, 0.25, 0.9, 1.3])),
        (tn.Ralston(), tn.SaveAt(), None),
    ],
)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_ode_fused_equals_general(solver, saveat, controller, backward):
    y0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0, t1 = (0.0, 1.3) if not backward else (1.3, 0.0)
    if backward and (saveat.ts is not None or controller is not None):
        pytest.skip("forward grids only")

    def run():
        kw = dict(saveat=saveat, controller=controller)
        if not isinstance(controller, tn.StepTo):
            kw["dt0"] = 0.07 if not backward else -0.07
        return tn.solve(tn.ODETerm(_f), solver, t0, t1, y0, **kw)

    a, b = _both(run)
    _same_solution(a, b)
    if saveat.dense:
        for t in (0.01, 0.33, 1.2):
            _same(a.evaluate(t), b.evaluate(t))


def test_fused_is_used_and_plans_the_loop_times():
    calls = []
    orig = FixedLoop.run

    def spy(self):
        calls.append(self._plan((self.t, self.dt, self.cstate, self.stops.ptr, 0))[0])
        return orig(self)

    FixedLoop.run = spy
    try:
        sol = tn.solve(tn.ODETerm(_f), tn.Euler(), 0.0, 1.0, torch.ones(2), dt0=0.3)
    finally:
        FixedLoop.run = orig
    assert len(calls) == 1
    ends = [p[1] for p in calls[0]]
    assert ends[-1] == 1.0 and len(ends) == sol.stats["num_steps"] == 4


def test_fusable_only_for_fixed_grids():
    y0 = torch.ones(2)
    seen = []
    saved = _solve_mod.fusable

    def spy(p):
        seen.append(saved(p))
        return seen[-1]

    _solve_mod.fusable = spy
    try:
        tn.solve(tn.ODETerm(_f), tn.Euler(), 0.0, 1.0, y0, dt0=0.25)
        tn.solve(tn.ODETerm(_f), tn.Tsit5(), 0.0, 1.0, y0, controller=tn.PIDController(rtol=1e-4, atol=1e-6))
        tn.solve(tn.ODETerm(lambda t, y, a: -y), tn.Euler(), 0.0, 1.0, y0.expand(3, 2), dt0=0.25, per_sample=True)
        ev = tn.Event(lambda t, y, a: y[0] - 0.5)
        tn.solve(tn.ODETerm(lambda t, y, a: -y), tn.Euler(), 0.0, 1.0, y0, dt0=0.25, event=ev)
    finally:
        _solve_mod.fusable = saved
    assert seen[0] is True and seen[1:] == [False] * (len(seen) - 1)


def test_nonfinite_solve_fails_as_in_the_general_loop():
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def blow(t, y, a):
        return y**4

    def run():
        return tn.solve(tn.ODETerm(blow), tn.Euler(), 0.0, 3.0, y0, dt0=0.1, throw=False, saveat=tn.SaveAt(steps=True))

    a, b = _both(run)
    assert a.result == tn.Result.nonfinite
    _same_solution(a, b)
    with pytest.raises(tn.SolveError) as e1:
        tn.solve(tn.ODETerm(blow), tn.Euler(), 0.0, 3.0, y0, dt0=0.1)
    assert "non-finite" in str(e1.value) or "NaN" in str(e1.value)


def test_max_steps_goes_to_the_general_loop():
    def run():
        return tn.solve(tn.ODETerm(_f), tn.Euler(), 0.0, 1.0, torch.ones(2), dt0=0.01, max_steps=10, throw=False)

    a, b = _both(run)
    assert a.result == tn.Result.max_steps_reached
    _same_solution(a, b)


@pytest.mark.parametrize("adjoint", [tn.DirectAdjoint(), tn.CheckpointAdjoint(), tn.BacksolveAdjoint()])
def test_ode_gradients_equal(adjoint):
    w = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([0.5, 1.0], dtype=torch.float64)

    def run():
        sol = tn.solve(tn.ODETerm(lambda t, y, a: -w * y + 0.1 * t), tn.RK4(), 0.0, 1.0, y0, dt0=0.1, adjoint=adjoint)
        (g,) = torch.autograd.grad(sol.ys.pow(2).sum(), w)
        return sol.ys.detach(), g

    (ya, ga), (yb, gb) = _both(run)
    _same(ya, yb)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


def _sde_term(kind, n, shape=(4, 2), levy=None, dtype=torch.float64, t0=0.0, t1=1.0):
    lo, hi = min(t0, t1), max(t0, t1)
    if kind == "grid":
        bm = BrownianGrid.uniform(lo, hi, n, shape, seed=3, levy_area=levy, dtype=dtype)
    else:
        bm = VirtualBrownianTree(lo, hi, shape, seed=3, levy_area=levy, dtype=dtype)
    return tn.MultiTerm(
        tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: 0.4 * torch.cos(y), bm, noise="diagonal")
    )


@pytest.mark.parametrize("kind", ["grid", "tree"])
@pytest.mark.parametrize(
    "solver, levy",
    [(tn.Euler(), None), (tn.Heun(), None), ("ItoMilstein", None), ("SRA1", "space-time"), ("ShARK", "space-time")],
)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_sde_fused_equals_general(kind, solver, levy, backward):
    if isinstance(solver, str):
        solver = getattr(tn, solver)()
    n = 16
    t0, t1 = (0.0, 1.0) if not backward else (1.0, 0.0)
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    additive = levy is not None

    def run():
        term = _sde_term(kind, n, levy=levy, t0=t0, t1=t1)
        if additive:  # SRA1 / ShARK: additive noise
            bm = term.terms[1].path
            term = tn.MultiTerm(
                tn.ODETerm(lambda t, y, a: -y),
                tn.ControlTerm(lambda t, y, a: 0.4 * torch.ones_like(y), bm, noise="diagonal", additive=True),
            )
        return tn.solve(term, solver, t0, t1, y0, dt0=(t1 - t0) / n, saveat=tn.SaveAt(ts=[t0, 0.5, t1]))

    a, b = _both(run)
    _same_solution(a, b)


def test_sde_gradients_and_reversible_equal():
    w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(solver, adjoint):
        bm = VirtualBrownianTree(0.0, 1.0, (4, 2), seed=5, dtype=torch.float64)
        term = tn.MultiTerm(
            tn.ODETerm(lambda t, y, a: -w * y), tn.ControlTerm(lambda t, y, a: 0.3 * w * y, bm, noise="diagonal")
        )
        sol = tn.solve(term, solver, 0.0, 1.0, y0, dt0=1 / 32, adjoint=adjoint)
        (g,) = torch.autograd.grad(sol.ys.sum(), w)
        return sol.ys.detach(), g

    for solver, adjoint in [
        (tn.Euler(), tn.DirectAdjoint()),
        (tn.Heun(), tn.BacksolveAdjoint()),
        (tn.ReversibleHeun(), tn.ReversibleAdjoint()),
    ]:
        (ya, ga), (yb, gb) = _both(lambda s=solver, ad=adjoint: run(s, ad))
        _same(ya, yb)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


class _Counting(BrownianGrid):
    """A BrownianGrid that counts its single queries."""

    queries = 0

    def increment(self, s, t):
        type(self).queries += 1
        return super().increment(s, t)

    def evaluate(self, s, t=None):
        type(self).queries += 1
        return super().evaluate(s, t)


def test_prefetch_replaces_the_step_queries():
    n = 20
    bm = _Counting.uniform(0.0, 1.0, n, (3, 2), seed=0, dtype=torch.float64)
    term = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: 0.2 * y, bm, noise="diagonal"))
    y0 = torch.ones(3, 2, dtype=torch.float64)
    _Counting.queries = 0
    tn.solve(term, tn.Euler(), 0.0, 1.0, y0, dt0=1.0 / n)
    if not hasattr(bm, "increments"):
        pytest.skip("paths without a vectorised increments() are queried step by step")
    assert _Counting.queries <= 2  # the first step's check, nothing per step


def test_prefetched_wrapper_forwards_and_falls_back():
    bm = VirtualBrownianTree(0.0, 1.0, (2,), seed=4, dtype=torch.float64)
    if not hasattr(bm, "increments"):
        pytest.skip("needs path.increments")
    ivs = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75)]
    pre = Prefetched(bm, ivs)
    pre._chunk = 2  # two chunks
    for s, t in ivs + [(0.1, 0.2), (0.75, 0.5)]:
        assert torch.equal(pre.evaluate(s, t), bm.evaluate(s, t))
        inc, ref = pre.increment(s, t), bm.increment(s, t)
        assert torch.equal(inc.W, ref.W) and inc.dt == ref.dt
    assert pre.t0 == 0.0 and pre.shape == bm.shape
    assert math.isclose(pre.t1, 1.0)


def test_fusable_reads_the_problem():
    class P:
        controller = tn.ConstantStepSize()
        per_sample = False
        events = None
        progress = None

    assert fusable(P())
    P.controller = tn.PIDController(rtol=1e-3, atol=1e-3)
    assert not fusable(P())


class _Resetting(tn.Euler):
    """A solver from outside torchnde whose step can turn a NaN state finite again."""

    def step(self, term, t0, t1, y0, f0):
        y1, err, dinfo, s1, code = super().step(term, t0, t1, y0, f0)
        return (torch.nan_to_num(y1) if t0 > 0.45 else y1), err, dinfo, s1, code


def test_outside_solvers_have_every_step_checked():
    def f(t, y, a):
        return y * (torch.tensor(math.nan) if 0.25 < float(t) < 0.35 else 1.0)

    def run():
        return tn.solve(tn.ODETerm(f), _Resetting(), 0.0, 1.0, torch.ones(2), dt0=0.1, throw=False)

    a, b = _both(run)
    assert a.result == tn.Result.nonfinite
    _same_solution(a, b)


def test_long_solves_are_planned_in_windows(monkeypatch):
    import torchnde._fixed as fixed

    monkeypatch.setattr(fixed, "WINDOW", 7)  # 40 steps in 6 windows
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(max_steps=4096):
        term = _sde_term("tree", 40)
        return tn.solve(
            term, tn.Heun(), 0.0, 1.0, y0, dt0=1 / 40, saveat=tn.SaveAt(steps=True), max_steps=max_steps, throw=False
        )

    a, b = _both(run)
    _same_solution(a, b)
    assert a.stats["num_steps"] == 40
    a, b = _both(lambda: run(max_steps=30))  # max_steps found in a later window
    assert a.result == tn.Result.max_steps_reached
    _same_solution(a, b)
