"""torch.compile: a solver step (with its vector field) compiles as one graph and agrees with eager."""

import pytest
import torch

import torchnde as tn
from torchnde._flat import _FlatTerm
from torchnde._tree import Flattener


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
    compiled = torch.compile(solver.step, fullgraph=True)  # fullgraph: any graph break raises
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
    compiled_net = torch.compile(net, fullgraph=True)
    eager = tn.solve(tn.ODETerm(lambda t, y, a: net(y)), tn.Dopri5(), 0.0, 1.0, y0, controller=ctrl)
    comp = tn.solve(tn.ODETerm(lambda t, y, a: compiled_net(y)), tn.Dopri5(), 0.0, 1.0, y0, controller=ctrl)
    assert comp.stats["num_steps"] == eager.stats["num_steps"]
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-5, atol=1e-6)
