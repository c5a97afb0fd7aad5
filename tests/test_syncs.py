"""Host synchronisations per solve: fixed-step solves (the fused loop) make a constant number,
whatever their number of steps; adaptive solves make a constant number per step.

A GPU pays for every ``.item()`` / ``.tolist()`` / ``bool(tensor)`` / ``float(tensor)`` /
``int(tensor)`` in the loop; they are counted here by wrapping those methods of torch.Tensor.
benchmarks/README.md ("Host synchronisations") lists the ones that remain and why.
"""

import contextlib

import pytest
import torch

import torchnde as tn
from torchnde.paths import BrownianGrid, VirtualBrownianTree

_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_syncs():
    counts = {"n": 0}
    saved = {m: getattr(torch.Tensor, m) for m in _METHODS}

    def wrap(fn):
        def inner(self, *a, **k):
            counts["n"] += 1
            return fn(self, *a, **k)

        return inner

    try:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, wrap(fn))
        yield counts
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)


def _sde(path_kind, n):
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if path_kind == "grid":
        bm = BrownianGrid.uniform(0.0, 1.0, n, (4, 2), seed=1, dtype=torch.float64)
    else:
        bm = VirtualBrownianTree(0.0, 1.0, (4, 2), seed=1, dtype=torch.float64)
    term = tn.MultiTerm(tn.ODETerm(lambda t, y, a: -y), tn.ControlTerm(lambda t, y, a: 0.3 * y, bm, noise="diagonal"))
    return term, y0


def _syncs(fn):
    fn()  # warm-up: one-time checks of the first call are not counted
    with count_syncs() as c:
        fn()
    return c["n"]


@pytest.mark.parametrize("path_kind", ["grid", "tree"])
@pytest.mark.parametrize("solver", [tn.Euler(), tn.Heun()], ids=["Euler", "Heun"])
def test_fixed_step_sde_syncs_do_not_grow_with_the_steps(path_kind, solver):
    counts = []
    for n in (10, 40):
        term, y0 = _sde(path_kind, n)
        counts.append(_syncs(lambda term=term, y0=y0, n=n: tn.solve(term, solver, 0.0, 1.0, y0, dt0=1.0 / n)))
    assert counts[0] == counts[1], counts
    assert counts[0] <= 8, counts


def test_fixed_step_ode_syncs_do_not_grow_with_the_steps():
    y0 = torch.randn(3, 2)
    counts = [
        _syncs(lambda n=n: tn.solve(tn.ODETerm(lambda t, y, a: -y), tn.RK4(), 0.0, 1.0, y0, dt0=1.0 / n))
        for n in (10, 40)
    ]
    assert counts[0] == counts[1] <= 8, counts


def test_adaptive_ode_syncs_per_step_are_bounded():
    """Adaptive steps: one sync for the finiteness check and one for the error norm's decision
    (Python-float step sizes), nothing that grows otherwise."""
    y0 = torch.randn(3, 2)
    ctrl = tn.PIDController(rtol=1e-6, atol=1e-6)

    def run():
        return tn.solve(tn.ODETerm(lambda t, y, a: -y), tn.Tsit5(), 0.0, 1.0, y0, controller=ctrl)

    sol = run()
    n = _syncs(run)
    steps = sol.stats["num_steps"]
    assert n <= 2 * steps + 4, (n, steps)
