"""The explicit Runge--Kutta fast path (no autograd, one step size, a small flat state: the stages
in a buffer kept for the solve, the user's function called directly) gives the values of the
general path bit for bit: the same solutions, saved times, dense output and evaluation counts
as the same solve with autograd on (which takes the general path)."""

import pytest
import torch

import torchnde as tn
from torchnde.solvers import AbstractERK

D = torch.float64

SOLVERS = [tn.Dopri5(), tn.Tsit5(), tn.Bosh3(), tn.Dopri8(), tn.RK4(), tn.Heun(), tn.Euler()]


def field(t, y, args):
    return torch.tanh(y @ args) * torch.cos(t) - 0.1 * y


def _both(fn, monkeypatch=None, stages=3):
    """``fn()`` with autograd on (general path) and under ``torch.no_grad()`` (fast path; with
    ``monkeypatch``, checked to be taken when the method has more than two stages)."""
    calls = []
    if monkeypatch is not None:
        fast_step = AbstractERK._step_buffered

        def counted(*a):
            calls.append(1)
            return fast_step(*a)

        monkeypatch.setattr(AbstractERK, "_step_buffered", counted)
    with torch.enable_grad():
        ref = fn()
    assert not calls
    with torch.no_grad():
        fast = fn()
    if monkeypatch is not None:
        assert bool(calls) == (stages > 2)
    return ref, fast


def _same(ref, fast):
    assert torch.equal(ref.ys, fast.ys)
    if ref.ts is not None:
        assert torch.equal(ref.ts, fast.ts)
    for k in ("nfe", "num_steps", "num_accepted", "num_rejected"):
        assert ref.stats[k] == fast.stats[k], k


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("backward", [False, True])
def test_adaptive_fast_path_is_bitwise_the_general_path(solver, backward, monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=g, dtype=D)
    y0 = torch.randn(4, 3, generator=g, dtype=D)
    t0, t1 = (1.0, 0.0) if backward else (0.0, 1.0)
    ts = torch.linspace(t0, t1, 5, dtype=D)
    pid = tn.PIDController(rtol=1e-5, atol=1e-7)
    args = dict(args=W, saveat=tn.SaveAt(ts=ts, dense=True))

    def run():
        if not isinstance(solver, tn.solvers.AbstractAdaptiveSolver):  # constant steps (the fused loop)
            return tn.solve(tn.ODETerm(field), solver, t0, t1, y0, dt0=(t1 - t0) / 8, **args)
        return tn.solve(tn.ODETerm(field), solver, t0, t1, y0, controller=pid, **args)

    ref, fast = _both(run, monkeypatch, solver.tableau.num_stages)
    _same(ref, fast)
    ths = torch.linspace(t0, t1, 7, dtype=D)
    assert torch.equal(ref.evaluate(ths), fast.evaluate(ths))


@pytest.mark.parametrize("kind", ["float_time", "tree", "steps", "stops"])
def test_fast_path_variants_are_bitwise_the_general_path(kind, monkeypatch):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 2, generator=g, dtype=torch.float32)
    y0 = torch.randn(5, 2, generator=g, dtype=torch.float32)
    pid = tn.PIDController(rtol=1e-4, atol=1e-6)
    saveat = tn.SaveAt(t1=True)
    if kind == "float_time":  # the user's function takes float times (no direct call)
        term = tn.ODETerm(lambda t, y, a: torch.tanh(y @ a) * (1 + t), time_as_float=True)
    elif kind == "tree":  # a dict state: stages in the buffer, the term's own vf
        term = tn.ODETerm(lambda t, y, a: {"u": torch.tanh(y["u"] @ a) - y["v"], "v": y["u"]})
        y0 = {"u": y0, "v": -y0}
    else:
        term = tn.ODETerm(field)
    if kind == "steps":
        saveat = tn.SaveAt(steps=True)
    if kind == "stops":
        pid = tn.PIDController(rtol=1e-4, atol=1e-6, step_ts=[0.3], jump_ts=[0.55])

    def run():
        return tn.solve(term, tn.Dopri5(), 0.0, 1.0, y0, args=W, saveat=saveat, controller=pid)

    ref, fast = _both(run, monkeypatch)
    pairs = [(ref.ys[k], fast.ys[k]) for k in ("u", "v")] if kind == "tree" else [(ref.ys, fast.ys)]
    for a, b in pairs:
        assert torch.equal(a, b)
    assert ref.stats["nfe"] == fast.stats["nfe"] and ref.stats["num_steps"] == fast.stats["num_steps"]


def test_fast_path_with_an_event_is_the_general_path():
    y0 = torch.tensor([1.0, 0.0], dtype=D)

    def osc(t, y, args):
        return torch.stack([y[1], -y[0]])

    ev = tn.Event(lambda t, y, args: y[0], terminal=True)

    def run():
        return tn.solve(tn.ODETerm(osc), tn.Tsit5(), 0.0, 5.0, y0, controller=tn.PIDController(1e-8, 1e-8), event=ev)

    ref, fast = _both(run)
    _same(ref, fast)
    assert torch.equal(torch.as_tensor(ref.t_final), torch.as_tensor(fast.t_final))


@pytest.mark.parametrize("solver", [tn.Dopri5(), tn.RK4(), tn.Dopri8()], ids=lambda s: type(s).__name__)
def test_saving_only_the_end_is_bitwise_the_general_path(solver, monkeypatch):
    """SaveAt(t1=True) and no events: nothing reads the steps' stages, which the fast path then
    leaves in the user's shape."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 3, generator=g)
    y0 = torch.randn(2, 4, 3, generator=g)
    kw = dict(args=W)
    if isinstance(solver, tn.solvers.AbstractAdaptiveSolver):
        kw["controller"] = tn.PIDController(rtol=1e-5, atol=1e-6)
    else:
        kw["dt0"] = 0.125
    ref, fast = _both(lambda: tn.solve(tn.ODETerm(field), solver, 0.0, 1.0, y0, **kw), monkeypatch)
    _same(ref, fast)


def test_stages_left_in_the_user_shape_give_the_same_dense_output():
    from torchnde._flat import flat_term
    from torchnde._tree import Flattener

    g = torch.Generator().manual_seed(3)
    W = torch.randn(3, 3, generator=g, dtype=D)
    y0 = torch.randn(4, 3, generator=g, dtype=D)
    flat = Flattener(y0, batch=False)
    solver = tn.Tsit5()
    out = []
    for need in (True, False):
        term = flat_term(tn.ODETerm(field), flat, W, 1.0, False)
        term.need_dense = need
        with torch.no_grad():
            y = flat.flatten(y0)
            f0 = solver.init(term, 0.0, y)
            y1, err, dinfo, f1, _ = solver.step(term, 0.0, 0.1, y, f0)
            assert (dinfo[-1][1].shape == y.shape) == need
            out.append((y1, err, f1, solver.dense_coeffs(term, dinfo)))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_stage_buffers_are_reused_across_solves_and_never_shared():
    """A finished solve hands its stage buffer to the next solve of the same state; a solve
    inside the vector field (same shapes) gets a buffer of its own."""
    from torchnde import _flat

    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 3, generator=g, dtype=D)
    y0 = torch.randn(4, 3, generator=g, dtype=D)
    pid = tn.PIDController(rtol=1e-6, atol=1e-8)

    def inner_field(t, y, args):  # a solve of the same shape inside each evaluation
        z = tn.solve(tn.ODETerm(field), tn.Dopri5(), 0.0, 0.05, y, args=args, controller=pid).ys[-1]
        return z - y

    def run(f):
        return tn.solve(tn.ODETerm(f), tn.Dopri5(), 0.0, 0.3, y0, args=W, controller=pid)

    _flat._SCRATCH_POOL.clear()
    ref, fast = _both(lambda: run(field))
    _same(ref, fast)
    assert _flat._SCRATCH_POOL  # handed back
    with torch.no_grad():
        again = run(field)
    _same(ref, again)
    ref, fast = _both(lambda: run(inner_field))
    _same(ref, fast)
