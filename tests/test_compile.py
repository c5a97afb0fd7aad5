"""torch.compile: a solver step (with its vector field) compiles as one graph and agrees with eager;
``solve(..., compile=True)`` reuses its compiled step across solves and counts evaluations as eagerly.

The tests that check caching, recompilation and the fallbacks use dynamo's ``eager``/``aot_eager``
backends (the guards and the graph are dynamo's, whatever the backend; inductor's code generation
costs seconds per graph); those marked ``inductor`` compile C++ and skip without a compiler.
"""

import shutil
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import torchnde as tn
from torchnde import _compile
from torchnde._flat import _FlatTerm
from torchnde._tree import Flattener
from torchnde.paths import VirtualBrownianTree

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None,
    reason="inductor needs a C++ compiler on CPU",
)


@pytest.fixture
def backend(monkeypatch):
    """Set the compile backend of solve(..., compile=True) for one test, from a clean cache."""

    def use(name):
        monkeypatch.setattr(_compile, "_BACKEND", name)
        _compile.clear_cache()
        torch._dynamo.reset()
        counters.clear()

    yield use
    _compile.clear_cache()
    torch._dynamo.reset()


def _graphs():
    return counters["stats"]["unique_graphs"]


def _mlp(dim=2, width=8):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))
    return net.requires_grad_(False)


def _solve(net, solver, y0, compile, **kw):
    term = tn.ODETerm(lambda t, y, args: net(y) * (1 + 0.1 * t.reshape(-1, 1)))  # a new closure each call, as in a loop
    return tn.solve(term, solver, kw.pop("t0", 0.0), kw.pop("t1", 1.0), y0, compile=compile, **kw)


def _same(comp, eager, rtol=1e-5, atol=1e-6):
    for k in ("num_steps", "num_accepted", "num_rejected", "nfe"):
        assert torch.equal(torch.as_tensor(comp.stats[k]), torch.as_tensor(eager.stats[k])), k
    torch.testing.assert_close(comp.ys, eager.ys, rtol=rtol, atol=atol)
    torch.testing.assert_close(comp.ts, eager.ts)


@pytest.mark.slow
@needs_cxx
def test_tsit5_adaptive_inductor_matches_eager(backend):
    """The real thing: Tsit5 with a PID controller, inductor, saving at given times (dense output
    on the compiled steps' information). Then a second solve of the same shapes compiles nothing."""
    backend("inductor")
    net = _mlp()
    y0 = torch.randn(4, 2)
    kw = dict(controller=tn.PIDController(rtol=1e-5, atol=1e-6), saveat=tn.SaveAt(ts=torch.linspace(0, 1, 5)))
    eager = _solve(net, tn.Tsit5(), y0, False, **kw)
    comp = _solve(net, tn.Tsit5(), y0, True, **kw)
    assert comp.stats["num_steps"] > 2
    _same(comp, eager)
    n = _graphs()
    assert n == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        y1 = torch.randn(4, 2)
        _same(_solve(net, tn.Tsit5(), y1, True, **kw), _solve(net, tn.Tsit5(), y1, False, **kw))
    assert _graphs() == n


@pytest.mark.parametrize("saveat", ["t1", "dense"])
def test_fixed_step_rk4_matches_eager_and_counts(backend, saveat):
    """RK4 (not FSAL): the derivative at a step's end is evaluated lazily (by the next step inside
    the compiled graph, or by dense output outside it): same NFE as eager, same values."""
    backend("aot_eager")
    net = _mlp()
    y0 = torch.randn(3, 2)
    kw = dict(dt0=0.1, saveat=tn.SaveAt(dense=True) if saveat == "dense" else tn.SaveAt(t1=True))
    eager = _solve(net, tn.RK4(), y0, False, **kw)
    comp = _solve(net, tn.RK4(), y0, True, **kw)
    assert eager.stats["nfe"] == 40 + (saveat == "dense")  # dense output: the last end derivative
    _same(comp, eager)
    if saveat == "dense":
        ts = torch.linspace(0, 1, 7)
        torch.testing.assert_close(comp.evaluate(ts), eager.evaluate(ts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_backwards_in_time_and_per_sample(backend, per_sample):
    backend("aot_eager")
    net = _mlp()
    y0 = torch.randn(3, 2)
    ctrl = tn.PIDController(rtol=1e-5, atol=1e-6)
    kw = dict(t0=1.0, t1=0.0, controller=ctrl, per_sample=per_sample)
    # the error norm is computed inside the compiled step and handed to the controller once
    _same(_solve(net, tn.Dopri5(), y0, True, **kw), _solve(net, tn.Dopri5(), y0, False, **kw))
    assert ctrl._pre is None


def test_sum_of_ode_terms(backend):
    """MultiTerm(ODETerm(f), ODETerm(g)): compiled (each part receives t as a tensor), as eagerly."""
    backend("aot_eager")
    net = _mlp()
    y0 = torch.randn(3, 2)
    terms = tn.MultiTerm(tn.ODETerm(lambda t, y, a: net(y)), tn.ODETerm(lambda t, y, a: -0.5 * y * t))
    kw = dict(controller=tn.PIDController(rtol=1e-5, atol=1e-6))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"solve\(\.\.\., compile=True\)")  # compiled: no fallback
        comp = tn.solve(terms, tn.Tsit5(), 0.0, 1.0, y0, compile=True, **kw)
    _same(comp, tn.solve(terms, tn.Tsit5(), 0.0, 1.0, y0, **kw))
    assert _graphs() == 1


def test_gradients_through_compiled_steps(backend):
    """Direct, backsolve and checkpoint gradients of compiled solves (one process, one vector
    field: their variants (grad or not, replays) compile without hitting the recompile limit)."""
    backend("aot_eager")
    net = _mlp().requires_grad_(True)
    y0 = torch.randn(3, 2)
    for adjoint in (tn.DirectAdjoint(), tn.BacksolveAdjoint(), tn.CheckpointAdjoint()):
        grads = []
        for compile in (False, True):
            net.zero_grad()
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=r"solve\(\.\.\., compile=True\)")  # no fallback
                kw = dict(controller=tn.PIDController(rtol=1e-4, atol=1e-6), adjoint=adjoint)
                sol = _solve(net, tn.Bosh3(), y0, compile, **kw)
                sol.ys.square().sum().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_solve_reuses_the_graph_and_new_shapes_recompile(backend):
    """A training loop: new solver object, new closure, new batch values, updated weights: no
    recompilation (dynamo would raise). A new batch size compiles again."""
    backend("eager")
    net = _mlp()
    kw = dict(controller=tn.PIDController(rtol=1e-4, atol=1e-6))
    _solve(net, tn.Tsit5(), torch.randn(4, 2), True, **kw)
    n = _graphs()
    assert n == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            with torch.no_grad():
                net[0].weight.mul_(1.01)
            sol = _solve(net, tn.Tsit5(), torch.randn(4, 2), True, **kw)
            assert sol.stats["num_steps"] > 1
    assert _graphs() == n
    _solve(net, tn.Tsit5(), torch.randn(5, 2), True, **kw)
    assert _graphs() > n


def test_compile_failure_falls_back_to_eager_with_a_warning(backend, monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    backend(broken)
    net = _mlp()
    y0 = torch.randn(3, 2)
    kw = dict(controller=tn.PIDController(rtol=1e-4, atol=1e-6))
    eager = _solve(net, tn.Tsit5(), y0, False, **kw)
    with pytest.warns(UserWarning, match="could not compile the Tsit5 step"):
        comp = _solve(net, tn.Tsit5(), y0, True, **kw)
    _same(comp, eager, rtol=0, atol=0)
    with warnings.catch_warnings():  # warned once: the pair stays eager without repeating it
        warnings.simplefilter("error")
        _same(_solve(net, tn.Tsit5(), y0, True, **kw), eager, rtol=0, atol=0)


def test_uncovered_solves_run_eagerly_with_a_warning(backend):
    """An implicit solver and an SDE: not compiled, said once per solve, solved eagerly."""
    backend("eager")
    y0 = torch.randn(3, 2)
    net = _mlp()
    with pytest.warns(UserWarning, match="only explicit Runge-Kutta solvers"):
        comp = _solve(net, tn.Kvaerno3(), y0, True, dt0=0.25)
    _same(comp, _solve(net, tn.Kvaerno3(), y0, False, dt0=0.25), rtol=0, atol=0)
    bm = VirtualBrownianTree(0.0, 1.0, (3, 2), seed=0)
    sde = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: 0.1 * y, bm, noise="diagonal"))
    with pytest.warns(UserWarning, match="only ODE terms are compiled"):
        comp = tn.solve(sde, tn.Euler(), 0.0, 1.0, y0, dt0=0.1, compile=True)
    torch.testing.assert_close(comp.ys, tn.solve(sde, tn.Euler(), 0.0, 1.0, y0, dt0=0.1).ys, rtol=0, atol=0)
    term = tn.ODETerm(lambda t, y, a: -y * t, time_as_float=True)  # Python-float times
    with pytest.warns(UserWarning, match="time_as_float=True"):
        comp = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, dt0=0.1, compile=True)
    torch.testing.assert_close(comp.ys, tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, dt0=0.1).ys, rtol=0, atol=0)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_step_compiles_without_graph_breaks(per_sample):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    y0 = torch.randn(8, 2)
    term = tn.ODETerm(lambda t, y, a: net(y) * (1 + 0.1 * (t if not per_sample else t[:, None])))
    flat = Flattener(y0, batch=per_sample)
    ft = _FlatTerm(term, flat, None, 1.0, per_sample)
    solver = tn.Tsit5()
    y = flat.flatten(y0)
    # times as tensors: 0-d for one step size, (batch,) per sample
    make = (lambda v: torch.full((8,), v)) if per_sample else (lambda v: torch.tensor(v))
    f0 = solver.init(ft, make(0.0), y)
    compiled = torch.compile(solver.step, fullgraph=True, backend="aot_eager")  # any graph break raises
    with torch._dynamo.config.patch(error_on_recompile=False):
        for i in range(3):
            t0, t1 = make(0.1 * i), make(0.1 * i + 0.05 + 0.01 * i)
            yc, ec, _, fc, _ = compiled(ft, t0, t1, y, f0)
            ye, ee, _, fe, _ = solver.step(ft, t0, t1, y, f0)
            torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ec, ee, rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(fc, fe, rtol=1e-5, atol=1e-6)
            y, f0 = ye, fe


def test_solve_with_compiled_vector_field_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    y0 = torch.randn(4, 3)
    ctrl = tn.PIDController(rtol=1e-5, atol=1e-5)
    compiled_net = torch.compile(net, fullgraph=True, backend="aot_eager")
    eager = tn.solve(tn.ODETerm(lambda t, y, a: net(y)), tn.Dopri5(), 0.0, 1.0, y0, controller=ctrl)
    comp = tn.solve(tn.ODETerm(lambda t, y, a: compiled_net(y)), tn.Dopri5(), 0.0, 1.0, y0, controller=ctrl)
    assert comp.stats["num_steps"] == eager.stats["num_steps"]
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-5, atol=1e-6)
