"""Reliability of the core (issue 16): no stalls, tracebacks or hidden failures for inputs a new
user tries. Each section belongs to one area; keep them separate."""

import math

import pytest
import torch

import torchnde as tn
from torchnde._solve import NONFINITE_REJECTIONS

F64 = torch.float64

# ============================================================================================
# the integration loop: NaN walls, step limits, empty batches, the meta device, failure reports


def _nan_after_half(t, y, args):
    """-y before t = 0.5 and NaN from there on (a vector field defined only up to some time)."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:  # per-sample: one time per sample
        return torch.where((t < 0.5).unsqueeze(-1), -y, torch.full_like(y, math.nan))
    return -y if t < 0.5 else torch.full_like(y, math.nan)


def _pid():
    return tn.PIDController(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", [tn.Tsit5(), tn.Dopri5()])
@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_nan_wall_ends_the_solve_early(solver, per_sample):
    # was: creeping towards t = 0.5 for all of max_steps (4096 steps, 24,578 evaluations)
    term = tn.ODETerm(_nan_after_half)
    y0 = torch.ones(4, 2, dtype=F64)
    sol = tn.solve(term, solver, 0.0, 1.0, y0, controller=_pid(), per_sample=per_sample, throw=False)
    assert sol.stats["nfe"] < 300
    assert (torch.as_tensor(sol.result) == tn.Result.nonfinite).all()
    assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) == NONFINITE_REJECTIONS).all()
    t_final = torch.as_tensor(sol.t_final)
    assert ((t_final > 0.49) & (t_final <= 0.5)).all()
    assert torch.isfinite(sol.ys).all()  # the last good state
    last = sol.ys[:, -1] if per_sample else sol.ys[-1]
    torch.testing.assert_close(last, y0 * torch.exp(-t_final.reshape(-1, 1)))


def test_loop_nan_wall_message_says_when_and_what_to_try():
    with pytest.raises(tn.SolveError) as e:
        tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, torch.ones(2, dtype=F64), controller=_pid())
    msg = str(e.value)
    assert "nonfinite" in msg and "at t = 0.49" in msg
    assert "valid only up to some time" in msg and "throw=False" in msg
    assert 0.49 < e.value.t <= 0.5 and e.value.samples is None


def test_loop_nan_wall_in_one_sample_does_not_hold_the_batch():
    # only sample 1 meets a NaN wall (at t = 0.5); the others solve to t1 = 1 as if alone
    def f(t, y, args):
        wall = (t >= 0.5) & (torch.arange(3) == 1)
        return torch.where(wall.unsqueeze(-1), torch.full_like(y, math.nan), -y)

    y0 = torch.ones(3, 2, dtype=F64)
    sol = tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True, throw=False)
    assert sol.result.tolist() == [0, int(tn.Result.nonfinite), 0]
    assert sol.stats["nfe"] < 300
    assert sol.stats["num_rejected_nonfinite"].tolist() == [0, NONFINITE_REJECTIONS, 0]
    assert 0.49 < sol.t_final[1] <= 0.5 and sol.t_final[[0, 2]].tolist() == [1.0, 1.0]
    torch.testing.assert_close(sol.ys[[0, 2], -1], torch.full((2, 2), math.exp(-1), dtype=F64), rtol=1e-5, atol=0)
    with pytest.raises(tn.SolveError, match=r"failed for 1 of 3 samples:\n  nonfinite for samples \[1\] at t = \[0\.4"):
        tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True)
    try:
        tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, controller=_pid(), per_sample=True)
    except tn.SolveError as e:
        assert e.samples == [1] and 0.49 < e.t[1] <= 0.5


def test_loop_nan_in_state_space_ends_too():
    # y' = -sqrt(y) reaches y = 0 at t = 2; trial steps past it take sqrt of negative numbers
    term = tn.ODETerm(lambda t, y, a: -torch.sqrt(y))
    for solver in (tn.Tsit5(), tn.Dopri5()):
        sol = tn.solve(term, solver, 0.0, 3.0, torch.ones(2, dtype=F64), controller=_pid(), throw=False)
        assert sol.result == tn.Result.nonfinite
        assert sol.stats["num_steps"] < 500  # was 4096 (max_steps) for Dopri5
        assert abs(sol.t_final - 2.0) < 1e-3


def test_loop_nan_from_a_too_long_step_is_not_a_wall():
    # NaN outside |y| < 10: a first step of 100 leaves that region; smaller steps do not
    term = tn.ODETerm(lambda t, y, a: torch.where(y.abs() < 10, -y, torch.full_like(y, math.nan)))
    for per_sample in (False, True):
        y0 = torch.ones(3, 1, dtype=F64)
        sol = tn.solve(term, tn.Tsit5(), 0.0, 5.0, y0, dt0=100.0, controller=_pid(), per_sample=per_sample)
        assert sol.successful
        assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) > 0).all()
        torch.testing.assert_close(sol.ys[:, -1] if per_sample else sol.ys[-1], y0 * math.exp(-5.0))


@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_max_steps_is_said_even_after_nan(per_sample):
    # the step limit is the reason the solve stopped: said so, with the NaN as a hint
    kw = dict(controller=_pid(), max_steps=20, per_sample=per_sample)
    y0 = torch.ones(2, 1, dtype=F64)
    sol = tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, y0, throw=False, **kw)
    assert (torch.as_tensor(sol.result) == tn.Result.max_steps_reached).all()
    assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) > 0).all()
    with pytest.raises(tn.SolveError, match=r"(?s)max_steps_reached.*increasing max_steps.*NaN/inf state"):
        tn.solve(tn.ODETerm(_nan_after_half), tn.Tsit5(), 0.0, 1.0, y0, **kw)


def test_loop_stats_have_the_same_keys_in_every_mode():
    term = tn.ODETerm(lambda t, y, a: -y)
    y0 = torch.ones(2, 1)
    keys = {"num_steps", "num_accepted", "num_rejected", "num_rejected_nonfinite", "nfe"}
    for per_sample in (False, True):
        for kw in (dict(dt0=0.1), dict(controller=_pid())):
            sol = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, per_sample=per_sample, **kw)
            assert set(sol.stats) == keys
            assert (torch.as_tensor(sol.stats["num_rejected_nonfinite"]) == 0).all()
            assert torch.as_tensor(sol.t_final).eq(1.0).all()


_EMPTY_SAVEATS = [
    tn.SaveAt(t1=True),
    tn.SaveAt(t0=True, ts=[0.0, 0.5, 1.0]),
    tn.SaveAt(steps=True),
    tn.SaveAt(t1=True, dense=True),
]


@pytest.mark.parametrize("saveat", _EMPTY_SAVEATS, ids=["t1", "ts", "steps", "dense"])
@pytest.mark.parametrize("kw", [dict(dt0=0.1), dict(controller=tn.PIDController())], ids=["fixed", "adaptive"])
def test_loop_empty_batch_is_an_empty_solution(saveat, kw):
    # was: ZeroDivisionError in the PID controller (adaptive) / IndexError (per-sample)
    term = tn.ODETerm(lambda t, y, a: -y)
    y0 = torch.ones(0, 3)
    n_saved = {"t1": 1, "ts": 4, "dense": 1}
    shared = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, saveat=saveat, **kw)
    assert shared.successful and shared.ys.shape[1:] == (0, 3) and shared.ys.shape[0] == shared.ts.shape[0]
    per = tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, saveat=saveat, per_sample=True, **kw)
    assert per.successful and per.result.shape == (0,) and per.stats["num_steps"].shape == (0,)
    T = n_saved.get("ts" if saveat.ts is not None else "steps" if saveat.steps else "dense" if saveat.dense else "t1")
    if T is not None:
        assert shared.ys.shape == (T, 0, 3) and shared.ts.shape == (T,)
    assert per.ys.shape[0] == 0 and per.ys.shape[2:] == (3,) and per.ts.shape == per.ys.shape[:2]
    if saveat.dense:
        assert shared.evaluate(0.5).shape == (0, 3) and per.evaluate(0.5).shape == (0, 3)


def test_loop_empty_batch_trees_and_backwards():
    term = tn.ODETerm(lambda t, y, a: {k: -v for k, v in y.items()})
    y0 = {"a": torch.ones(0, 3), "b": torch.ones(0, 2, 2)}
    sol = tn.solve(term, tn.Tsit5(), 1.0, 0.0, y0, dt0=-0.1, per_sample=True, saveat=tn.SaveAt(ts=[1.0, 0.5, 0.0]))
    assert sol.ys["a"].shape == (0, 3, 3) and sol.ys["b"].shape == (0, 3, 2, 2) and sol.ts.shape == (0, 3)


@pytest.mark.parametrize("per_sample", [False, True])
def test_loop_meta_device_is_refused_early(per_sample):
    # was: "Tensor.item() cannot be called on meta tensors" from inside the loop
    calls = []
    term = tn.ODETerm(lambda t, y, a: calls.append(t) or -y)
    for y0 in (torch.ones(2, 3, device="meta"), (torch.ones(2, 3, device="meta"),)):
        for kw in (dict(dt0=0.1), dict(controller=_pid())):
            with pytest.raises(ValueError, match="cannot run on the meta device.*real device"):
                tn.solve(term, tn.Tsit5(), 0.0, 1.0, y0, per_sample=per_sample, **kw)
    assert not calls  # refused before any evaluation


# ============================================================================================
# terms: time as a tensor, two-argument vector fields, Milstein on graph-less diffusions,
# checks of noise declarations, CDE vector-field shapes


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_terms_time_reaches_the_vector_field_as_a_0d_tensor(dtype):
    # the everyday time-conditioning idiom (torchcfm's wrapper, most neural-ODE code)
    net = torch.nn.Linear(3, 2).to(dtype)
    seen = []

    def f(t, y, args):
        seen.append(t)
        return net(torch.cat([t.expand(y.shape[0], 1), y], -1)) + 0 * t.repeat(y.shape[0], 1)

    y0 = torch.ones(4, 2, dtype=dtype)
    sol = tn.solve(tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, dt0=0.25)
    assert sol.successful and sol.ys.dtype == dtype
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == dtype for t in seen)
    assert float(seen[0]) == 0.0 and float(seen[-1]) == pytest.approx(1.0)
    # per-sample: one time per sample, as before
    seen.clear()
    tn.solve(tn.ODETerm(lambda t, y, a: seen.append(t) or -y), tn.Tsit5(), 0.0, 1.0, y0, dt0=0.5, per_sample=True)
    assert all(t.shape == (4,) for t in seen)


def test_terms_time_as_float_opt_out_and_the_other_terms():
    seen = []
    y0 = torch.ones(2, 1, dtype=F64)
    tn.solve(tn.ODETerm(lambda t, y, a: seen.append(t) or -y, time_as_float=True), tn.Euler(), 0.0, 1.0, y0, dt0=0.5)
    assert seen and all(type(t) is float for t in seen)
    # the diffusion of an SDE and the vector field of a CDE receive tensors too
    seen.clear()
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=(2, 1), seed=0, dtype=F64)
    g = lambda t, y, a: seen.append(t) or torch.ones_like(y) * t.expand(2, 1)  # noqa: E731
    sde = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(g, bm, noise="diagonal"))
    tn.solve(sde, tn.Heun(), 0.0, 1.0, y0, dt0=0.5)
    ts = torch.linspace(0, 1, 4, dtype=F64)
    path = tn.paths.HermiteCubic(ts, torch.randn(2, 4, 3, dtype=F64))
    cde = tn.ControlTerm(lambda t, y, a: seen.append(t) or torch.ones(2, 1, 3, dtype=F64) * t, path)
    tn.solve(cde, tn.Tsit5(), 0.0, 1.0, y0, dt0=0.5)
    assert len(seen) > 4 and all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in seen)


def test_terms_nn_modules_receive_tensor_time():
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, t, y):
            return self.lin(torch.cat([t.expand(y.shape[0], 1), y], -1))

    from torchnde.nn import NeuralODE

    model = NeuralODE(Field(), solver=tn.RK4(), dt0=0.5)
    assert model(torch.ones(5, 2)).ys.shape == (1, 5, 2)


def test_terms_time_tensors_are_cached_and_protected():
    from torchnde._terms import user_time

    y = torch.ones(3)
    a, b = user_time(0.125, y), user_time(0.125, y)
    assert a is b and a.dtype == torch.float32 and float(a) == 0.125
    assert user_time(0.125, y.double()).dtype == F64
    assert user_time(0.125, torch.ones(2, dtype=torch.complex64)).dtype == torch.float32
    assert user_time(0.125, {"a": y.double()}).dtype == F64
    a.add_(1.0)  # user code that modifies t in place does not change later evaluations
    assert float(user_time(0.125, y)) == 0.125
    user_time(0.125, y).requires_grad_()
    assert not user_time(0.125, y).requires_grad
    with torch.inference_mode():
        inf = user_time(0.375, y)
    assert inf.is_inference() and not user_time(0.375, y).is_inference()  # usable outside inference mode
    t = torch.tensor(0.5)
    assert user_time(t, y) is t  # tensors pass unchanged
    # the same inside solve(): a vector field that modifies t in place does not shift later times
    seen = []

    def f(t, y, args):
        seen.append(float(t))
        t.mul_(100.0)
        return -y

    for _ in range(2):
        seen.clear()
        tn.solve(tn.ODETerm(f), tn.Euler(), 0.0, 1.0, torch.ones(2, dtype=F64), dt0=0.25)
        assert seen == [0.0, 0.25, 0.5, 0.75]


def test_terms_time_gradients_still_work():
    # d y(t1) / d t1 = f(t1, y(t1)) and d y(t1) / d t0 = -dy(t1)/dy0 f(t0, y0), with f = -t y
    f = tn.ODETerm(lambda t, y, a: -t * y)
    t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
    t1 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    y0 = torch.ones(1, dtype=F64)
    sol = tn.solve(f, tn.Tsit5(), t0, t1, y0, controller=tn.PIDController(rtol=1e-10, atol=1e-10))
    g0, g1 = torch.autograd.grad(sol.ys[-1].sum(), (t0, t1))
    y1 = math.exp(-0.5)
    assert float(g1) == pytest.approx(-1.0 * y1, rel=1e-6)
    assert float(g0) == pytest.approx(0.0, abs=1e-8)  # f(t0 = 0, y0) = 0


def test_terms_two_argument_vector_field_says_how_to_wrap_it():
    def f(t, y):
        return -y

    with pytest.raises(
        TypeError, match=r"calls its vector field as f\(t, y, args\).*wrap it: ODETerm\(lambda t, y, args: f\(t, y\)\)"
    ):
        tn.ODETerm(f)
    with pytest.raises(TypeError, match=r"wrap it: ODETerm\(lambda t, y, args: f\(t, y\)\)"):
        tn.ODETerm(lambda t, y: -y)
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=(2,), seed=0)
    with pytest.raises(TypeError, match=r"ControlTerm calls its vector field as g\(t, y, args\).*ControlTerm\(lambda"):
        tn.ControlTerm(lambda t, y: y, bm, noise="diagonal")

    class TwoArgs(torch.nn.Module):
        def forward(self, t, y):
            return -y

    with pytest.raises(TypeError, match=r"TwoArgs.*\(t, y\)"):
        tn.ODETerm(TwoArgs())
    with pytest.raises(TypeError, match="cannot take"):
        tn.ODETerm(lambda y: -y)

    # what keeps working: three parameters, *args, defaults, modules, partials
    class ThreeArgs(torch.nn.Module):
        def forward(self, t, y, args):
            return -y

    import functools

    for ok in (
        lambda t, y, args: -y,
        lambda *a: -a[1],
        lambda t, y, args=None, scale=1.0: -y,
        ThreeArgs(),
        functools.partial(lambda k, t, y, args: -k * y, 1.0),
        ThreeArgs().forward,
    ):
        sol = tn.solve(tn.ODETerm(ok), tn.Euler(), 0.0, 1.0, torch.ones(2), dt0=0.5)
        assert sol.successful


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general"])
@pytest.mark.parametrize("milstein", [tn.ItoMilstein, tn.StratonovichMilstein])
def test_terms_milstein_on_a_diffusion_without_y_is_euler_maruyama(noise, milstein):
    # was: "element 0 of tensors does not require grad" (torch.autograd.grad on a graph-less g)
    shape, gshape, wshape = {
        "diagonal": ((4, 1), (4, 1), (4, 1)),
        "scalar": ((4, 3), (4, 3), (4, 1)),
        "general": ((4, 3), (4, 3, 2), (4, 2)),
    }[noise]
    bm = tn.VirtualBrownianTree(0.0, 1.0, shape=wshape, seed=0, dtype=F64)
    kw = dict(commutative=True) if noise == "general" else {}
    y0 = torch.ones(shape, dtype=F64)
    for g in (
        lambda t, y, a: 0.5 * torch.ones(gshape, dtype=F64),
        lambda t, y, a: (1 + t) * torch.ones(gshape, dtype=F64),
    ):
        sde = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(g, bm, noise=noise, **kw))
        a = tn.solve(sde, milstein(), 0.0, 1.0, y0, dt0=0.1).ys
        b = tn.solve(sde, tn.Euler(), 0.0, 1.0, y0, dt0=0.1).ys
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # gradients with respect to y0 still flow (DirectAdjoint through the steps)
    y0g = y0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(tn.solve(sde, milstein(), 0.0, 1.0, y0g, dt0=0.1).ys.sum(), y0g)
    torch.testing.assert_close(grad, torch.full_like(y0, 0.9**10))


def _bm(shape, seed=0):
    return tn.VirtualBrownianTree(0.0, 1.0, shape=shape, seed=seed, dtype=F64)


def test_terms_check_noise_additive():
    y = torch.randn(3, 2, dtype=F64)
    good = tn.ControlTerm(lambda t, y, a: torch.ones_like(y) * (1 + t), _bm((3, 2)), noise="diagonal", additive=True)
    good.check_noise(0.5, y)  # passes
    good.check_noise(0.5, y.requires_grad_())  # also on a state that requires grad
    tree = tn.ControlTerm(lambda t, y, a: {"a": 0 * y["a"] + 1}, _bm((3, 2)), noise="diagonal", additive=True)
    tree.check_noise(0.0, {"a": y.detach()})
    bad = tn.ControlTerm(lambda t, y, a: 0.1 * y, _bm((3, 2)), noise="diagonal", additive=True)
    with pytest.raises(ValueError, match=r"declares additive=True, but g depends on y"):
        bad.check_noise(0.5, torch.randn(3, 2, dtype=F64))


def _rotation_g(t, y, a):
    """g = [y, J y] with J a rotation by 90 degrees: L^1 g^2 = J y, L^2 g^1 = J y (commutative)."""
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=y.dtype)
    return torch.stack([y, y @ J.T], -1)


def _shear_g(t, y, a):
    """g = [e1 * y2, e2]: L^1 g^2 = 0 but L^2 g^1 = e1 (not commutative)."""
    one = torch.ones_like(y[..., 0])
    zero = torch.zeros_like(one)
    return torch.stack([torch.stack([y[..., 1], zero], -1), torch.stack([zero, one], -1)], -1)


def test_terms_check_noise_commutative_general():
    y = torch.randn(5, 2, dtype=F64)
    tn.ControlTerm(_rotation_g, _bm((5, 2)), commutative=True).check_noise(0.0, y)
    with pytest.raises(ValueError, match=r"declares commutative=True, but L\^j g\^k != L\^k g\^j.*j=\d, k=\d"):
        tn.ControlTerm(_shear_g, _bm((5, 2)), commutative=True).check_noise(0.0, y)
    # float32: round-off is not mistaken for non-commutativity
    tn.ControlTerm(_rotation_g, _bm((5, 2)), commutative=True).check_noise(0.0, y.float())


def test_terms_check_noise_diagonal():
    y = torch.randn(4, 3, dtype=F64)
    tn.ControlTerm(lambda t, y, a: torch.sin(y), _bm((4, 3)), noise="diagonal").check_noise(0.0, y)
    coupled = tn.ControlTerm(
        lambda t, y, a: y.sum(-1, keepdim=True) * torch.ones_like(y), _bm((4, 3)), noise="diagonal"
    )
    with pytest.raises(ValueError, match=r"declares noise='diagonal', but component \d of g depends on component \d"):
        coupled.check_noise(0.0, y)
    # one component per row (or a 0-d state): nothing can couple
    tn.ControlTerm(lambda t, y, a: y * y, _bm(()), noise="diagonal").check_noise(0.0, torch.tensor(0.3, dtype=F64))


def test_terms_check_true_verifies_in_solve():
    y0 = torch.ones(3, 2, dtype=F64)
    drift = tn.ODETerm(lambda t, y, a: -y)
    ok = tn.MultiTerm(drift, tn.ControlTerm(_rotation_g, _bm((3, 2)), commutative=True, check=True))
    assert tn.solve(ok, tn.ItoMilstein(), 0.0, 1.0, y0, dt0=0.1).successful
    bad = tn.MultiTerm(drift, tn.ControlTerm(_shear_g, _bm((3, 2)), commutative=True, check=True))
    with pytest.raises(ValueError, match="declares commutative=True"):
        tn.solve(bad, tn.ItoMilstein(), 0.0, 1.0, y0, dt0=0.1)
    additive = tn.ControlTerm(lambda t, y, a: 0.1 * y, _bm((3, 2)), noise="diagonal", additive=True, check=True)
    with pytest.raises(ValueError, match="declares additive=True"):
        tn.solve(tn.MultiTerm(drift, additive), tn.Euler(), 0.0, 1.0, y0, dt0=0.1)
    # unchecked (the default), the declaration is trusted: no error
    trusted = tn.ControlTerm(lambda t, y, a: 0.1 * y, _bm((3, 2)), noise="diagonal", additive=True)
    assert tn.solve(tn.MultiTerm(drift, trusted), tn.Euler(), 0.0, 1.0, y0, dt0=0.1).successful


def test_terms_cde_vector_field_without_channel_dimension():
    # was: a raw "mat1 and mat2 shapes cannot be multiplied" / bmm error from inside the product
    ts = torch.linspace(0, 1, 5, dtype=F64)
    path = tn.paths.HermiteCubic(ts, torch.randn(3, 5, 2, dtype=F64))
    lin = torch.nn.Linear(4, 4).double()
    z0 = torch.zeros(3, 4, dtype=F64)
    msg = r"returned shape \(3, 4\); .* it must return shape \(3, 4, 2\) = \(\*y.shape, channels\); it is missing"
    with pytest.raises(ValueError, match=msg):
        tn.solve(tn.ControlTerm(lambda t, z, a: lin(z), path), tn.Tsit5(), 0.0, 1.0, z0, dt0=0.25)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, z):
            return self.lin(z)

    from torchnde.nn import NeuralCDE

    model = NeuralCDE(Field(), torch.nn.Linear(2, 4).double())
    with pytest.raises(ValueError, match=r"NeuralCDE vector field returned shape \(3, 4\).*\(3, 4, 2\)"):
        model(path)
    # one matrix for the whole batch still broadcasts
    A = torch.randn(4, 2, dtype=F64)
    assert tn.solve(tn.ControlTerm(lambda t, z, a: A, path), tn.Tsit5(), 0.0, 1.0, z0, dt0=0.25).successful
