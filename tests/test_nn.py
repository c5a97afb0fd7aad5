"""torchnde.nn.NeuralODE: a vector-field module and a solve as one nn.Module."""

import copy
import io

import pytest
import torch
from torch import nn

import torchnde as tn
from torchnde.nn import NeuralODE


class Field(nn.Module):
    def __init__(self, n=2, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, width), nn.Tanh(), nn.Linear(width, n))

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t)


class FieldWithArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, y, args):
        return self.lin(y) * args


def _adjoint(name):
    return tn.DirectAdjoint() if name == "direct" else getattr(tn, name)()


def test_forward_returns_the_solution_of_solve():
    f = Field()
    y0 = torch.randn(5, 2)
    ts = torch.linspace(0, 1, 4)
    model = NeuralODE(f, saveat=tn.SaveAt(ts=ts))
    sol = model(y0)
    assert isinstance(sol, tn.Solution)
    assert sol.ys.shape == (4, 5, 2)
    ref = tn.solve(
        tn.ODETerm(lambda t, y, a: f(t, y)),
        tn.Tsit5(),
        0.0,
        1.0,
        y0,
        saveat=tn.SaveAt(ts=ts),
        controller=tn.PIDController(rtol=1e-3, atol=1e-6),
    )
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=0)
    # defaults: Tsit5, PID(1e-3, 1e-6), DirectAdjoint, the value at t1
    model = NeuralODE(f)
    assert isinstance(model.solver, tn.Tsit5)
    assert (model.controller.rtol, model.controller.atol) == (1e-3, 1e-6)
    assert isinstance(model.adjoint, tn.DirectAdjoint)
    sol = model(y0, 0.0, 0.5)
    assert sol.ys.shape == (1, 5, 2) and sol.ts.tolist() == [0.5]
    # forward's saveat overrides the constructor's; backwards in time works
    back = model(sol.ys[-1], 0.5, 0.0, saveat=tn.SaveAt(t0=True, t1=True))
    assert back.ts.tolist() == [0.5, 0.0]
    torch.testing.assert_close(back.ys[-1], y0, rtol=1e-2, atol=1e-3)
    assert "Tsit5" in repr(model) and "PIDController" in repr(model)


def test_closed_form_linear_field():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.5, 1.0], [-1.0, -0.5]]))

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            return self.lin(y)

    model = NeuralODE(Lin(), controller=tn.PIDController(rtol=1e-8, atol=1e-8)).double()
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = torch.linalg.matrix_exp(2.0 * lin.weight.detach().double()) @ y0
    torch.testing.assert_close(model(y0, 0.0, 2.0).ys[-1], exact, rtol=1e-6, atol=1e-7)


def test_args_reach_a_three_argument_field():
    f = FieldWithArgs()
    model = NeuralODE(f)
    y0 = torch.randn(3, 2)
    scale = torch.tensor(0.5, requires_grad=True)
    out = model(y0, args=scale).ys[-1]
    ref = tn.solve(
        tn.ODETerm(f), tn.Tsit5(), 0.0, 1.0, y0, args=scale, controller=tn.PIDController(rtol=1e-3, atol=1e-6)
    )
    torch.testing.assert_close(out, ref.ys[-1], rtol=0, atol=0)
    out.sum().backward()
    assert scale.grad is not None and f.lin.weight.grad is not None


def test_signature_is_checked():
    with pytest.raises(TypeError, match=r"\(t, y\) and would ignore it"):
        NeuralODE(Field())(torch.zeros(2), args=1.0)

    class One(nn.Module):
        def forward(self, y):
            return y

    class Four(nn.Module):
        def forward(self, t, y, args, extra):
            return y

    class KwOnly(nn.Module):
        def forward(self, t, y, *, scale):
            return y

    class VarArgs(nn.Module):
        def forward(self, *inputs):
            return -inputs[1]

    class Defaults(nn.Module):
        def forward(self, t, y, args=None, extra=None):
            return -y

    for bad in (One(), Four(), KwOnly(), nn.Linear(2, 2)):
        with pytest.raises(TypeError, match=r"\(t, y\) or \(t, y, args\)"):
            NeuralODE(bad)
    with pytest.raises(TypeError, match="nn.Module"):
        NeuralODE(lambda t, y: -y)
    y0 = torch.ones(2)
    expected = torch.exp(-torch.ones(2))
    for ok in (VarArgs(), Defaults()):
        torch.testing.assert_close(NeuralODE(ok)(y0).ys[-1], expected, rtol=1e-3, atol=1e-4)
    # re-setting the vector field re-reads its signature
    model = NeuralODE(Field())
    model.vector_field = FieldWithArgs()
    model(torch.zeros(2), args=1.0)
    with pytest.raises(TypeError, match=r"\(t, y\) or \(t, y, args\)"):
        model.vector_field = One()
    with pytest.raises(TypeError, match="nn.Module"):
        model.vector_field = None
    assert isinstance(model.vector_field, FieldWithArgs)  # a rejected field leaves the model as it was


def test_solver_controller_and_dt0_are_checked():
    f = Field()
    with pytest.raises(ValueError, match="dt0"):
        NeuralODE(f, solver=tn.RK4())
    with pytest.raises(TypeError, match="no error estimate"):
        NeuralODE(f, solver=tn.Euler(), controller=tn.PIDController(), dt0=0.1)
    with pytest.raises(TypeError, match="instance"):
        NeuralODE(f, solver=tn.Tsit5)
    with pytest.raises(TypeError, match="adjoint"):
        NeuralODE(f, adjoint="backsolve")
    with pytest.raises(TypeError, match="SaveAt"):
        NeuralODE(f, saveat=[0.0, 1.0])
    with pytest.raises(ValueError, match="max_steps"):
        NeuralODE(f, max_steps=0)
    # fixed steps with dt0
    y0 = torch.randn(2)
    model = NeuralODE(f, solver=tn.RK4(), dt0=0.1)
    sol = model(y0)
    assert sol.stats["num_steps"] == 10
    ref = tn.solve(tn.ODETerm(lambda t, y, a: f(t, y)), tn.RK4(), 0.0, 1.0, y0, dt0=0.1)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=0)
    # max_steps is passed on
    with pytest.raises(tn.SolveError, match="max_steps"):
        NeuralODE(f, controller=tn.PIDController(rtol=1e-12, atol=1e-12), max_steps=3)(y0)


def test_module_plumbing_parameters_state_dict_to_deepcopy():
    model = NeuralODE(Field())
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "vector_field.net.0.weight",
        "vector_field.net.0.bias",
        "vector_field.net.2.weight",
        "vector_field.net.2.bias",
    ]
    y0 = torch.randn(4, 2)
    out = model(y0).ys

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = NeuralODE(Field())
    assert not torch.equal(other(y0).ys, out)
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(other(y0).ys, out, rtol=0, atol=0)

    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(y0).ys, out, rtol=0, atol=0)

    double = model.to(torch.float64)
    assert double.vector_field.net[0].weight.dtype == torch.float64
    assert double(y0.double()).ys.dtype == torch.float64


@pytest.mark.parametrize("adjoint", ["direct", "CheckpointAdjoint", "BacksolveAdjoint"])
def test_training_step_with_an_optimizer(adjoint):
    torch.manual_seed(0)
    model = NeuralODE(Field(), adjoint=_adjoint(adjoint), controller=tn.PIDController(rtol=1e-6, atol=1e-7))
    ref = NeuralODE(copy.deepcopy(model.vector_field), controller=tn.PIDController(rtol=1e-6, atol=1e-7))
    y0 = torch.randn(8, 2)
    target = torch.randn(8, 2)
    ts = torch.linspace(0, 1, 3)
    losses = []
    for m in (model, ref):
        loss = (m(y0, saveat=tn.SaveAt(ts=ts)).ys[-1] - target).square().mean()
        loss.backward()
        losses.append(loss.item())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("adjoint", ["CheckpointAdjoint", "BacksolveAdjoint", "ReversibleAdjoint"])
def test_functional_call_with_recomputing_adjoints_raises(adjoint):
    # these adjoints re-evaluate the vector field during backward, after functional_call has put
    # the module's own parameters back: they must refuse rather than return wrong gradients
    model = NeuralODE(Field(), adjoint=_adjoint(adjoint), controller=tn.PIDController(rtol=1e-6, atol=1e-7))
    y0 = torch.randn(3, 2)
    params = {k: (v.detach() + 0.3).requires_grad_() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (y0,)).ys[-1]
    with pytest.raises(RuntimeError, match="functional_call"):
        torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)


@pytest.mark.parametrize("adjoint", ["direct"])
def test_functional_call(adjoint):
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-7)
    model = NeuralODE(Field(), adjoint=_adjoint(adjoint), controller=ctrl)
    y0 = torch.randn(3, 2)
    same = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(model, same, (y0,)).ys, model(y0).ys, rtol=0, atol=0)
    # other parameter values are used, and gradients reach the tensors passed in
    params = {k: (v + 0.3 * torch.randn_like(v)).requires_grad_() for k, v in same.items()}
    out = torch.func.functional_call(model, params, (y0,)).ys[-1]
    assert not torch.allclose(out, model(y0).ys[-1])
    grads = torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)
    direct = NeuralODE(model.vector_field, controller=ctrl)
    ref_out = torch.func.functional_call(direct, params, (y0,)).ys[-1]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    expected = torch.autograd.grad(ref_out.square().sum(), list(params.values()))
    for g, e in zip(grads, expected):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_torch_compile_of_the_vector_field():
    torch._dynamo.reset()
    torch.manual_seed(0)
    y0 = torch.randn(8, 2)
    model = NeuralODE(Field())
    eager = model(y0)
    # (aot_eager: dynamo and AOTAutograd as with the default backend, without inductor's codegen)
    model.vector_field = torch.compile(model.vector_field, backend="aot_eager")
    compiled = model(y0)
    assert compiled.stats["num_steps"] == eager.stats["num_steps"]
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-5, atol=1e-6)
    compiled.ys.sum().backward()
    assert model.vector_field._orig_mod.net[0].weight.grad is not None
    # Module.compile() compiles in place and keeps the state_dict keys
    torch._dynamo.reset()
    other = NeuralODE(Field())
    other.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()})
    other.vector_field.compile(backend="aot_eager")
    torch.testing.assert_close(other(y0).ys, eager.ys, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


_DDP_SCRIPT = """
import copy, sys
import torch
from torch import nn
import torch.distributed as dist
import torchnde as tn
from torchnde.nn import NeuralODE

class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    def forward(self, t, y):
        return self.net(y)

adj = tn.DirectAdjoint() if sys.argv[1] == "direct" else getattr(tn, sys.argv[1])()
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[2], 1), rank=0, world_size=1)
try:
    torch.manual_seed(0)
    model = NeuralODE(Field(), adjoint=adj, controller=tn.PIDController(rtol=1e-6, atol=1e-7))
    ref = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    y0 = torch.randn(8, 2)
    for m in (ddp, ref):
        m(y0, saveat=tn.SaveAt(ts=[0.5, 1.0])).ys.square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    # unused-parameter detection walks the returned Solution (a dataclass)
    ddp2 = nn.parallel.DistributedDataParallel(copy.deepcopy(ref), find_unused_parameters=True)
    ddp2(y0).ys.sum().backward()
    assert all(p.grad is not None for p in ddp2.parameters())
finally:
    dist.destroy_process_group()
print("ok")
"""


@pytest.mark.parametrize("adjoint", ["direct", "BacksolveAdjoint"])
def test_distributed_data_parallel_gloo_single_process(adjoint, tmp_path):
    # in a child process: gloo's threads and process-group state stay out of the test process
    import subprocess
    import sys

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, adjoint, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
