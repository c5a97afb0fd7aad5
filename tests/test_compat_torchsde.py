"""torchnde.compat.torchsde against torchsde itself: the same SDE, the same Brownian path."""

import math
import warnings

import pytest
import torch

from torchnde.compat import torchsde as ts

torchsde = pytest.importorskip("torchsde")

B, D, M = 3, 2, 3
F64 = torch.float64


class SDE(torch.nn.Module):
    """A nonlinear test SDE of each noise type. ``g`` does not depend on time (torchnde's
    EulerHeun evaluates its second diffusion at ``t_n`` where torchsde uses ``t_{n+1}``), and the
    additive ``g`` is constant (SRA1's stages: same remark)."""

    def __init__(self, noise_type, sde_type, dtype=F64):
        super().__init__()
        self.noise_type, self.sde_type = noise_type, sde_type
        gen = torch.Generator().manual_seed(1)
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))
        self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=dtype))
        self.G = torch.randn(B, D, M, generator=gen, dtype=dtype) * 0.2
        self.Wm = torch.randn(D, D * M, generator=gen, dtype=dtype) * 0.3

    def f(self, t, y):
        return -self.a * y + torch.sin(t) + 0.1 * y**2

    def g(self, t, y):
        if self.noise_type == "diagonal":
            return self.b * torch.cos(y)
        if self.noise_type == "scalar":
            return (self.b * torch.sin(y) + 0.1).unsqueeze(-1)
        if self.noise_type == "additive":
            return self.b * self.G
        return self.b * torch.tanh(y @ self.Wm).view(B, D, M)

    def h(self, t, y):
        return -y


def noise_dim(noise):
    return {"diagonal": D, "scalar": 1}.get(noise, M)


def bm_for(noise, entropy=3, levy="space-time", dtype=F64, t1=1.0):
    return ts.BrownianInterval(0.0, t1, size=(B, noise_dim(noise)), dtype=dtype, entropy=entropy,
                               levy_area_approximation=levy)  # fmt: skip


CASES = [
    ("ito", noise, method)
    for method, noises in (
        ("euler", ("diagonal", "scalar", "additive", "general")),
        ("milstein", ("diagonal", "scalar", "additive")),
        ("srk", ("diagonal", "scalar", "additive")),
    )
    for noise in noises
] + [
    ("stratonovich", noise, method)
    for method, noises in (
        ("midpoint", ("diagonal", "scalar", "additive", "general")),
        ("heun", ("diagonal", "scalar", "additive", "general")),
        ("euler_heun", ("diagonal", "scalar", "additive", "general")),
        ("reversible_heun", ("diagonal", "scalar", "additive", "general")),
        ("milstein", ("diagonal", "scalar", "additive")),
        ("log_ode", ("diagonal", "scalar", "additive", "general")),
    )
    for noise in noises
]


@pytest.mark.parametrize("sde_type,noise,method", CASES)
def test_pathwise_equal_to_torchsde(sde_type, noise, method):
    """torchsde driven by our Brownian path: every fixed-step method agrees to rounding error,
    also at output times between steps (dt does not divide the output spacing)."""
    sde = SDE(noise, sde_type)
    y0 = torch.full((B, D), 0.7, dtype=F64)
    tt = torch.linspace(0, 1, 7, dtype=F64)
    # log_ode reads the (Foster) Lévy area from the Brownian motion: the same path gives the same A
    bm = bm_for(noise, levy="foster" if method == "log_ode" else "space-time")
    ref = torchsde.sdeint(sde, y0, tt, bm=bm, method=method, dt=0.05)
    ours = ts.sdeint(sde, y0, tt, bm=bm, method=method, dt=0.05)
    assert ours.shape == (7, B, D)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_torchsde_brownian_motion_as_bm():
    """A torchsde BrownianInterval (with space-time Lévy area) drives our sdeint too."""
    sde = SDE("additive", "ito")
    y0 = torch.full((B, D), 0.7, dtype=F64)
    tt = torch.linspace(0, 1, 4, dtype=F64)
    for method in ("euler", "srk"):
        # a torchsde BrownianInterval's values depend on the order of its queries: a fresh one for each
        bms = [torchsde.BrownianInterval(0.0, 1.0, size=(B, M), dtype=F64, entropy=5,
                                         levy_area_approximation="space-time") for _ in range(2)]  # fmt: skip
        # dt = 1/8: no last step of 1e-16 (where U / h loses all digits, differently in each library)
        ref = torchsde.sdeint(sde, y0, tt, bm=bms[0], method=method, dt=0.125)
        ours = ts.sdeint(sde, y0, tt, bm=bms[1], method=method, dt=0.125)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_float32_and_time_dtype():
    sde = SDE("diagonal", "stratonovich", dtype=torch.float32)
    y0 = torch.full((B, D), 0.7)
    tt = torch.linspace(0, 1, 5)
    bm = bm_for("diagonal", dtype=torch.float32)
    seen = []
    f = sde.f
    sde.f = lambda t, y: seen.append(t) or f(t, y)
    ref = torchsde.sdeint(sde, y0, tt, bm=bm, method="midpoint", dt=0.03)
    seen.clear()
    ours = ts.sdeint(sde, y0, tt, bm=bm, method="midpoint", dt=0.03)
    assert ours.dtype == torch.float32
    assert isinstance(seen[0], torch.Tensor) and seen[0].dim() == 0 and seen[0].dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_logqp_matches_torchsde():
    for noise in ("diagonal", "general"):
        sde = SDE(noise, "stratonovich")
        y0 = torch.full((B, D), 0.7, dtype=F64)
        tt = torch.linspace(0, 1, 5, dtype=F64)
        # torchsde's logqp augments the state by one component; diagonal noise then has D + 1 channels
        bm = ts.BrownianInterval(0.0, 1.0, size=(B, D + 1 if noise == "diagonal" else M), dtype=F64, entropy=2)
        ys_ref, lr_ref = torchsde.sdeint(sde, y0, tt, bm=bm, method="midpoint", dt=0.02, logqp=True)
        ys, lr = ts.sdeint(sde, y0, tt, bm=bm, method="midpoint", dt=0.02, logqp=True)
        assert ys.shape == (5, B, D) and lr.shape == (4, B)
        torch.testing.assert_close(ys, ys_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(lr, lr_ref, rtol=0, atol=1e-12)


def test_names_extra_and_shapes():
    class Renamed:
        noise_type, sde_type = "diagonal", "ito"

        def drift(self, t, y):
            return -y

        def diff(self, t, y):
            return 0.2 * torch.ones_like(y)

    y0 = torch.ones(B, D, dtype=F64)
    tt = [0.0, 0.5, 1.0]
    ys, extra = ts.sdeint(Renamed(), y0, tt, method="euler", dt=0.1, names={"drift": "drift", "diffusion": "diff"},
                          extra=True)  # fmt: skip
    assert ys.shape == (3, B, D) and extra == ()
    assert ts.sdeint(Renamed(), y0, [0.0], names={"drift": "drift", "diffusion": "diff"}).shape == (1, B, D)
    # default method (milstein for Itô diagonal noise here) and default Brownian motion
    ys = ts.sdeint(SDE("diagonal", "ito"), y0, torch.linspace(0, 1, 3, dtype=F64), dt=0.05)
    assert ys.shape == (3, B, D) and torch.isfinite(ys).all()

    # f_and_g only
    class FG:
        noise_type, sde_type = "general", "stratonovich"

        def f_and_g(self, t, y):
            return -y, 0.1 * torch.ones(*y.shape, 4, dtype=y.dtype)

    assert ts.sdeint(FG(), y0, [0.0, 1.0], dt=0.1).shape == (2, B, D)


def test_ito_mean_statistically():
    """Default Brownian motion: E[y(1)] of dy = mu y dt + sigma y dW (Itô) is y0 exp(mu)."""

    class GBM:
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return 0.5 * y

        def g(self, t, y):
            return 0.4 * y

    torch.manual_seed(0)
    n = 2000
    ys = ts.sdeint(GBM(), torch.ones(n, 1, dtype=F64), [0.0, 1.0], method="euler", dt=0.05)
    mean = ys[-1].mean()
    se = ys[-1].std() / n**0.5
    assert abs(mean - torch.exp(torch.tensor(0.5, dtype=F64))) < 4 * se


@pytest.mark.parametrize(
    "sde_type,method", [("stratonovich", "heun"), ("stratonovich", "midpoint"), ("ito", "euler"), ("ito", "milstein")]
)
def test_adaptive_takes_torchsde_steps(sde_type, method):
    """Adaptive steps: torchsde's step-doubling estimate and step-size rule, outputs interpolated
    between steps: the same drift evaluations and values as torchsde on the same path (heun used
    its embedded Euler estimate before, ~10x the evaluations)."""
    sde = SDE("diagonal", sde_type)
    count = [0]
    f = sde.f
    sde.f = lambda t, y: count.__setitem__(0, count[0] + 1) or f(t, y)
    y0 = torch.full((B, D), 0.7, dtype=F64)
    tt = torch.linspace(0, 1, 5, dtype=F64)
    bm = bm_for("diagonal")
    kw = dict(bm=bm, method=method, adaptive=True, dt=0.05, rtol=1e-3, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adaptive Euler's warning
        ref = torchsde.sdeint(sde, y0, tt, **kw)
        n_ref, count[0] = count[0], 0
        ys = ts.sdeint(sde, y0, tt, **kw)
    torch.testing.assert_close(ys, ref, rtol=0, atol=1e-10)
    assert count[0] == n_ref


def test_adaptive_euler_on_stratonovich_warns_then_raises():
    """torchsde's order: the adaptive Euler warning comes before the method/SDE-type check."""
    y0 = torch.full((B, D), 0.7, dtype=F64)
    with pytest.warns(UserWarning, match="Euler--Maruyama"), pytest.raises(ValueError, match="stratonovich"):
        ts.sdeint(SDE("diagonal", "stratonovich"), y0, [0.0, 1.0], method="euler", adaptive=True)
    with pytest.warns(UserWarning, match="Euler--Maruyama"):
        ts.sdeint(SDE("diagonal", "ito"), y0, [0.0, 1.0], method="euler", adaptive=True, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["midpoint", "reversible_heun"])
def test_adjoint_gradients(method):
    """reversible_heun: ReversibleAdjoint gives sdeint's gradients exactly; midpoint: the
    continuous adjoint agrees with torchsde's sdeint_adjoint and, to O(dt), with sdeint's."""
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.full((B, D), 0.7, dtype=F64)
    tt = torch.linspace(0, 1, 5, dtype=F64)
    bm = bm_for("diagonal", levy="none")
    params = list(sde.parameters())
    ys = ts.sdeint(sde, y0, tt, bm=bm, method=method, dt=0.01)
    g_direct = torch.autograd.grad(ys.sum(), params)
    ys_adj = ts.sdeint_adjoint(sde, y0, tt, bm=bm, method=method, dt=0.01)
    torch.testing.assert_close(ys_adj, ys, rtol=0, atol=1e-12)
    g_adj = torch.autograd.grad(ys_adj.sum(), params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g_ref = torch.autograd.grad(torchsde.sdeint_adjoint(sde, y0, tt, bm=bm, method=method, dt=0.01).sum(), params)
    if method == "reversible_heun":
        for a, b in zip(g_adj, g_direct):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    else:
        for a, b, c in zip(g_adj, g_direct, g_ref):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-4)


def test_adjoint_y0_gradient_and_params_check():
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.full((B, D), 0.7, dtype=F64, requires_grad=True)
    tt = torch.linspace(0, 1, 3, dtype=F64)
    bm = bm_for("diagonal")
    (ga,) = torch.autograd.grad(ts.sdeint_adjoint(sde, y0, tt, bm=bm, method="reversible_heun", dt=0.02).sum(), y0)
    (gd,) = torch.autograd.grad(ts.sdeint(sde, y0, tt, bm=bm, method="reversible_heun", dt=0.02).sum(), y0)
    torch.testing.assert_close(ga, gd, rtol=1e-10, atol=1e-10)

    class Plain:
        noise_type, sde_type = "diagonal", "stratonovich"
        f = sde.f
        g = sde.g

    with pytest.raises(ValueError, match="adjoint_params"):
        ts.sdeint_adjoint(Plain(), y0, tt)


def test_errors():
    y0 = torch.ones(B, D, dtype=F64)
    tt = [0.0, 1.0]
    ito, strat = SDE("diagonal", "ito"), SDE("diagonal", "stratonovich")
    # log_ode needs a Lévy-area approximation; srk needs the space-time Lévy area (torchsde's ValueErrors)
    with pytest.raises(ValueError, match="foster"):
        ts.sdeint(strat, y0, tt, method="log_ode", bm=bm_for("diagonal", levy="space-time"))
    with pytest.raises(ValueError, match="space-time"):
        ts.sdeint(ito, y0, tt, method="srk", bm=bm_for("diagonal", levy="none"))
    with pytest.raises(ValueError, match="adjoint_method='midpoint'"):
        ts.sdeint_adjoint(strat, y0, tt, adjoint_method="log_ode")
    with pytest.raises(ValueError, match="stratonovich"):
        ts.sdeint(ito, y0, tt, method="midpoint")
    with pytest.raises(ValueError, match="noise type general"):
        ts.sdeint(SDE("general", "ito"), y0, tt, method="milstein")
    with pytest.raises(ValueError, match="Expected method"):
        ts.sdeint(ito, y0, tt, method="rk4")
    with pytest.raises(ValueError, match="adjoint_method"):
        ts.sdeint(strat, y0, tt, method="adjoint_reversible_heun")
    with pytest.raises(TypeError, match="step_size"):
        ts.sdeint(ito, y0, tt, step_size=0.1)
    with pytest.raises(TypeError, match="options"):
        ts.sdeint(ito, y0, tt, method="euler", options={"grad_free": True})
    ts.sdeint(ito, y0, tt, method="milstein", options={"grad_free": True}, dt=0.1)  # accepted
    with pytest.raises(TypeError, match="names"):
        ts.sdeint(ito, y0, tt, names={"drfit": "f"})
    with pytest.raises(ValueError, match="2-dimensional"):
        ts.sdeint(ito, torch.ones(D, dtype=F64), tt)
    with pytest.raises(ValueError, match="strictly increasing"):
        ts.sdeint(ito, y0, [0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="Noise sizes"):
        ts.sdeint(ito, y0, tt, bm=ts.BrownianInterval(0.0, 1.0, size=(B, 5), dtype=F64))
    with pytest.raises(NotImplementedError, match="sdeint_adjoint"):
        ts.sdeint_adjoint(strat, y0, tt, method="reversible_heun", extra=True)

    class GProdOnly:
        noise_type, sde_type = "general", "ito"

        def f(self, t, y):
            return y

        def g_prod(self, t, y, v):
            return v

    with pytest.raises(ValueError, match="Cannot infer noise size"):
        ts.sdeint(GProdOnly(), y0, tt)


def test_brownian_wrappers():
    bm = ts.BrownianInterval(0.0, 2.0, size=(2000, 2), dtype=F64, entropy=7, levy_area_approximation="davie")
    assert bm.shape == (2000, 2) and bm.levy_area_approximation == "davie" and bm.dtype == F64
    torch.testing.assert_close(bm(0.0, 0.7) + bm(0.7, 1.3), bm(0.0, 1.3))
    torch.testing.assert_close(bm(1.3), bm(0.0, 1.3))
    assert abs(bm(0.5, 1.5).var() - 1.0) < 0.1  # variance h
    W, U = bm(0.5, 1.5, return_U=True)
    inc = bm.increment(0.5, 1.5)
    torch.testing.assert_close(U, 1.0 * (0.5 * W + inc.H))
    W, U, A = bm(0.5, 1.5, return_U=True, return_A=True)
    assert A.shape == (2000, 2, 2)
    torch.testing.assert_close(A, -A.transpose(-1, -2))
    torch.testing.assert_close(A, bm(0.5, 1.5, return_A=True)[1])  # same query, same value
    assert ts.BrownianInterval(0.0, 1.0, size=(2, 2))(0.0, 1.0, return_U=True)[1] is None

    w0 = torch.full((4, 3), 2.0)
    tree = ts.BrownianTree(0.0, w0, t1=1.0, entropy=1)
    torch.testing.assert_close(tree(0.0), w0)
    torch.testing.assert_close(tree(0.4) - w0, tree(0.0, 0.4))
    path = ts.BrownianPath(0.0, w0)
    assert path(0.5).shape == (4, 3)

    with pytest.raises(TypeError, match="supported"):
        ts.BrownianInterval(0.0, 1.0, size=(2, 2), bogus=1)
    with pytest.raises(ValueError, match="does not match"):
        ts.BrownianInterval(0.0, 1.0, size=(2, 3), W=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="levy_area_approximation"):
        ts.BrownianInterval(0.0, 1.0, size=(2, 2), levy_area_approximation="nope")


# ------------------------------------------------------------------ issue 16: drop-in parity
def test_torchsde_names_base_classes_and_settings():
    """BaseSDE / SDEIto / SDEStratonovich, the settings containers and brownian_interval_like:
    what torchsde's examples and its tests' problems.py import."""

    class Ito(ts.SDEIto):
        def __init__(self):
            super().__init__(noise_type="diagonal")

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.1 * torch.ones_like(y)

    sde = Ito()
    assert isinstance(sde, torch.nn.Module) and (sde.sde_type, sde.noise_type) == ("ito", "diagonal")
    assert ts.SDEStratonovich("general").sde_type == "stratonovich"
    assert ts.BaseSDE(noise_type="scalar", sde_type="ito").noise_type == "scalar"
    with pytest.raises(ValueError, match="noise type"):
        ts.BaseSDE(noise_type="diag", sde_type="ito")
    with pytest.raises(ValueError, match="sde type"):
        ts.SDEIto.__mro__[1](noise_type="diagonal", sde_type="ito2")
    assert ts.NOISE_TYPES.diagonal == "diagonal" and "scalar" in ts.NOISE_TYPES
    assert ts.SDE_TYPES.all() == ["ito", "stratonovich"] and ts.METHODS.log_ode_midpoint == "log_ode"
    assert ts.LEVY_AREA_APPROXIMATIONS.space_time == "space-time" and "grad_free" in ts.METHOD_OPTIONS
    assert ts.sdeint(sde, torch.ones(2, 3), [0.0, 0.5], dt=0.1).shape == (2, 2, 3)
    y = torch.zeros(4, 2, dtype=F64)
    bm = ts.brownian_interval_like(y, t0=0.0, t1=2.0, entropy=1, levy_area_approximation="space-time")
    assert isinstance(bm, ts.BrownianInterval) and isinstance(bm, ts.BaseBrownian)
    assert bm.shape == (4, 2) and bm.dtype == F64 and (bm.t0, bm.t1) == (0.0, 2.0)


def test_reverse_brownian():
    bm = ts.BrownianInterval(0.0, 1.0, size=(3, 2), dtype=F64, entropy=4, levy_area_approximation="space-time")
    rb = ts.ReverseBrownian(bm)
    assert (rb.t0, rb.t1) == (-1.0, 0.0) and rb.shape == bm.shape and rb.levy_area_approximation == "space-time"
    torch.testing.assert_close(rb(-0.7, -0.2), bm(0.2, 0.7), rtol=0, atol=0)
    # as a torchnde path: the same W, the Lévy area of the reversed interval
    inc, fwd = rb.increment(-0.7, -0.2), bm.increment(0.2, 0.7)
    torch.testing.assert_close(inc.W, fwd.W)
    torch.testing.assert_close(inc.H, -fwd.H)
    # torchsde's own ReverseBrownian agrees on our Brownian motion
    torch.testing.assert_close(torchsde.ReverseBrownian(bm)(-0.7, -0.2), rb(-0.7, -0.2))


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general"])
def test_reversible_heun_extra_state_and_reversibility(noise):
    """extra=True returns torchsde's (f, g, z); solving the minus-SDE backwards on the reversed path
    from it recovers the forward solution (torchsde's test_reversibility)."""
    sde = SDE(noise, "stratonovich")
    y0 = torch.full((B, D), 0.1, dtype=F64)
    tt = torch.linspace(0, 1.9, 20, dtype=F64)
    bm = ts.BrownianInterval(0.0, 1.9, size=(B, noise_dim(noise)), dtype=F64, entropy=8)
    ys, (f, g, z) = ts.sdeint(sde, y0, tt, bm=bm, method="reversible_heun", dt=0.1, extra=True)
    ref, (f_ref, g_ref, z_ref) = torchsde.sdeint(sde, y0, tt, bm=bm, method="reversible_heun", dt=0.1, extra=True)
    torch.testing.assert_close(ys, ref, rtol=0, atol=1e-12)
    for a, b in ((f, f_ref), (g, g_ref), (z, z_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    class Minus:
        noise_type, sde_type = noise, "stratonovich"

        def f(self, t, y):
            return -sde.f(-t, y)

        def g(self, t, y):
            return -sde.g(-t, y)

    back = ts.sdeint(Minus(), ys[-1], -tt.flip(0), bm=ts.ReverseBrownian(bm), method="reversible_heun", dt=0.1,
                     extra_solver_state=(-f, -g, z))  # fmt: skip
    torch.testing.assert_close(back.flip(0), ys, rtol=1e-9, atol=1e-9)


def test_g_prod_only_sdes_match_g():
    """An SDE defining only g_prod (or f_and_g_prod) gives exactly what the same SDE with g gives."""
    vec = torch.randn(M, dtype=F64, generator=torch.Generator().manual_seed(0))

    class WithG:
        noise_type, sde_type = "general", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return y.unsqueeze(-1).sigmoid() * vec

    class GProd(WithG):
        g = None

        def g_prod(self, t, y, v):
            return (y.unsqueeze(-1).sigmoid() * vec).bmm(v.unsqueeze(-1)).squeeze(-1)

    class FAndGProd:
        noise_type, sde_type = "general", "ito"

        def f_and_g_prod(self, t, y, v):
            return -y, GProd.g_prod(self, t, y, v)

    class DiagGProd:
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -y

        def g_prod(self, t, y, v):
            return 0.3 * torch.cos(y) * v

    y0 = torch.full((B, D), 0.5, dtype=F64)
    outs = [ts.sdeint(sde, y0, [0.0, 1.0], dt=0.1, bm=bm_for("general", levy="none")) for sde in
            (WithG(), GProd(), FAndGProd())]  # fmt: skip
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    diag = ts.sdeint(DiagGProd(), y0, [0.0, 1.0], dt=0.1, method="euler", bm=bm_for("diagonal", levy="none"))
    ref = torchsde.sdeint(DiagGProd(), y0, [0.0, 1.0], dt=0.1, method="euler", bm=bm_for("diagonal", levy="none"))
    torch.testing.assert_close(diag, ref, rtol=0, atol=1e-12)


def test_brownian_conditioned_on_end_values():
    """BrownianInterval(W=...) / BrownianTree(w1=...): a Brownian bridge to the given end value
    (shape, dtype and device from W), H drawn given W unless given too."""
    W = torch.linspace(-1, 1, 4000, dtype=F64).view(2000, 2)
    bm = ts.BrownianInterval(0.0, 2.0, W=W, entropy=3, levy_area_approximation="space-time")
    assert bm.shape == (2000, 2) and bm.dtype == F64
    torch.testing.assert_close(bm(0.0, 2.0), W)
    mid = bm(0.0, 0.5)
    z = (mid - W * 0.25) / math.sqrt(0.5 * 1.5 / 2.0)  # bridge: mean W s / T, variance s (T - s) / T
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    H = bm.increment(0.0, 2.0).H
    assert abs(float(H.std()) - math.sqrt(2.0 / 12)) < 0.02  # H | W ~ N(0, T/12)
    H_given = torch.full_like(W, 0.3)
    bm2 = ts.BrownianInterval(0.0, 2.0, W=W, H=H_given, entropy=3, levy_area_approximation="space-time")
    torch.testing.assert_close(bm2.increment(0.0, 2.0).H, H_given)
    w0, w1 = torch.zeros(5, 1), torch.ones(5, 1)
    tree = ts.BrownianTree(0.0, w0, t1=1.0, w1=w1, entropy=2)
    torch.testing.assert_close(tree(1.0), w1)


def test_float32_ts_fixed_steps_take_no_sliver_steps():
    """float32 ts: the steps are torchsde's grid itself (10 midpoint steps: 20 drift evaluations
    plus torchsde's one shape check), not float64 steps of dt that end 1e-9 short of each grid time."""
    count = [0]

    class Counting:
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            count[0] += 1
            return -y

        def g(self, t, y):
            return 0.1 * torch.ones_like(y)

    ts.sdeint(Counting(), torch.ones(4, 2), torch.linspace(0, 1, 11), method="midpoint", dt=0.1)
    assert count[0] == 21


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "general"])
def test_ito_sdeint_adjoint(noise):
    """sdeint_adjoint on Itô SDEs with non-additive noise: the values are sdeint's exactly, the
    gradients those of the stochastic adjoint of the Stratonovich form (to O(dt) of sdeint's)."""
    sde = SDE(noise, "ito")
    method = "euler" if noise == "general" else "milstein"
    y0 = torch.full((B, D), 0.7, dtype=F64, requires_grad=True)
    tt = torch.linspace(0, 1, 3, dtype=F64)
    bm = bm_for(noise, levy="none")
    params = [y0, *sde.parameters()]
    ys = ts.sdeint(sde, y0, tt, bm=bm, method=method, dt=1e-2)
    g_direct = torch.autograd.grad((ys**2).sum(), params)
    ys_adj = ts.sdeint_adjoint(sde, y0, tt, bm=bm, method=method, dt=1e-2)
    torch.testing.assert_close(ys_adj, ys, rtol=0, atol=1e-12)
    g_adj = torch.autograd.grad((ys_adj**2).sum(), params)
    for a, b in zip(g_adj, g_direct):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    # torchsde's latent-SDE usage: Itô, euler, logqp
    ys_q, lq = ts.sdeint_adjoint(sde, y0, tt, bm=bm_for(noise, levy="none") if noise != "diagonal" else None,
                                 method="euler", logqp=True, dt=0.01)  # fmt: skip
    torch.autograd.grad(ys_q.sum() + lq.sum(), params)


def test_srk_is_srid2_on_diagonal_noise_and_is_the_default():
    from torchnde.solvers import SRID2

    assert isinstance(ts._solver_for("srk", "ito", "diagonal", {}), SRID2)
    assert ts._default_method("ito", "scalar") == "srk" and ts._default_method("ito", "general") == "euler"


@pytest.mark.parametrize("sde_type", ["stratonovich", "ito"])
def test_adjoint_through_a_context_computed_outside_the_solve(sde_type):
    """torchsde's latent-SDE idiom: the drift adds a context computed from an encoder outside the
    solve, the encoder's parameters passed in adjoint_params: the gradient reaches them (it used to
    fail with "backward through the graph a second time") and agrees with sdeint's."""
    gen = torch.Generator().manual_seed(0)

    class Latent(torch.nn.Module):
        noise_type = "diagonal"

        def __init__(self):
            super().__init__()
            self.sde_type = sde_type
            self.lin = torch.nn.Linear(D, D).double()
            self.ctx = None

        def f(self, t, y):
            return torch.tanh(self.lin(y)) + self.ctx

        def g(self, t, y):
            return 0.2 * torch.sigmoid(y)

    sde, enc = Latent(), torch.nn.Linear(3, D).double()
    x = torch.randn(B, 3, dtype=F64, generator=gen)
    y0 = torch.full((B, D), 0.3, dtype=F64)
    tt = torch.linspace(0, 1, 3, dtype=F64)
    params = (*sde.parameters(), *enc.parameters())
    grads = []
    for solve in (ts.sdeint, ts.sdeint_adjoint):
        sde.ctx = enc(x)
        kw = {} if solve is ts.sdeint else {"adjoint_params": params}
        ys = solve(
            sde,
            y0,
            tt,
            bm=bm_for("diagonal", levy="none"),
            dt=0.01,
            method="euler" if sde_type == "ito" else "midpoint",
            **kw,
        )
        grads.append(torch.autograd.grad(ys.sum(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method", ["milstein", "srk", "reversible_heun"])
def test_adjoint_with_constant_or_parameter_free_fields(method):
    """torchsde's test_basic: drift and diffusion that do not depend on y, or on no parameter
    that requires grad: backward works, unused adjoint parameters get zero gradients."""

    class Const(torch.nn.Module):
        noise_type = "diagonal"

        def __init__(self, uses_param):
            super().__init__()
            self.sde_type = "stratonovich" if method == "reversible_heun" else "ito"
            self.p = torch.nn.Parameter(torch.ones(1, D, dtype=F64))
            self.unused = torch.nn.Parameter(torch.ones(1, D, dtype=F64))
            self.uses_param = uses_param

        def f(self, t, y):
            return (self.p * 0.2 if self.uses_param else 0.1) + torch.zeros_like(y)

        def g(self, t, y):
            return torch.sigmoid(self.p * 0.3 if self.uses_param else torch.zeros_like(y)) + torch.zeros_like(y)

    for uses_param in (True, False):
        sde = Const(uses_param)
        ys = ts.sdeint_adjoint(sde, torch.full((B, D), 0.1, dtype=F64), [0.0, 0.5], method=method, dt=0.05)
        ys.sum().backward()
        assert torch.equal(sde.unused.grad, torch.zeros_like(sde.unused))
        assert (sde.p.grad.abs().sum() > 0) == uses_param


def _torchsde_loop_grid(t0, t1, dt, dtype):
    """torchsde's own fixed-step times: ``t <- min(t + dt, t1)`` on a 0-d tensor of ``ts``'s dtype."""
    t, end, out = torch.tensor(t0, dtype=dtype), torch.tensor(t1, dtype=dtype), []
    while True:
        t = torch.minimum(t + dt, end)
        if t >= end:
            return out
        out.append(float(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_grid_is_torchsdes_accumulated_time(dtype):
    """The grid (accumulated by numpy in chunks) is torchsde's step-by-step ``t + dt``, bit for bit,
    including float32's last sliver step; a dt below the dtype's resolution raises instead of hanging."""
    from torchnde.compat.torchsde import _torchsde_grid

    for t0, t1, dt in ((0.0, 1.0, 0.01), (-0.3, 2.7, 0.013), (5.0, 5.5, 1e-3), (0.0, 64.0, 1.0), (0.0, 1.0, 0.7)):
        a, b = float(torch.tensor(t0, dtype=dtype)), float(torch.tensor(t1, dtype=dtype))
        assert _torchsde_grid(a, b, dt, dtype) == _torchsde_loop_grid(a, b, dt, dtype)
    assert len(_torchsde_grid(0.0, 1.0, 0.01, torch.float32)) == 100  # 101 steps: float32 ends short of 1
    with pytest.raises(ValueError, match="resolution"):
        _torchsde_grid(1e4, 1e4 + 1, 1e-5, torch.float32)


@pytest.mark.parametrize("method", ["euler", "heun", "reversible_heun"])
def test_float32_ts_equals_native_solve_on_the_same_grid(method):
    """sdeint with float32 ts is torchnde's solve on torchsde's float32 grid (StepTo), on the
    same VirtualBrownianTree: the same values to rounding error, with and without gradients."""
    import torchnde as tn
    from torchnde.compat.torchsde import _torchsde_grid

    sde_type = "ito" if method == "euler" else "stratonovich"
    sde = SDE("diagonal", sde_type, dtype=torch.float32)
    y0 = torch.full((B, D), 0.7)
    tt = torch.tensor([0.0, 1.0])
    bm = bm_for("diagonal", levy="none", dtype=torch.float32)
    ours = ts.sdeint(sde, y0, tt, bm=bm, method=method, dt=0.02)
    solver = {"euler": tn.Euler, "heun": tn.Heun, "reversible_heun": tn.ReversibleHeun}[method]()
    term = tn.MultiTerm(
        tn.ODETerm(lambda t, y, args: sde.f(t, y)),
        tn.ControlTerm(lambda t, y, args: sde.g(t, y), bm._tree, noise="diagonal", calculus=sde_type),
    )
    grid = _torchsde_grid(0.0, 1.0, 0.02, torch.float32)
    native = tn.solve(term, solver, 0.0, 1.0, y0, controller=tn.StepTo(grid)).ys[-1]
    torch.testing.assert_close(ours[-1], native, rtol=0, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours[-1].sum(), sde.a)
    (g_native,) = torch.autograd.grad(
        tn.solve(term, solver, 0.0, 1.0, y0, controller=tn.StepTo(grid)).ys[-1].sum(), sde.a
    )
    torch.testing.assert_close(g_ours, g_native, rtol=1e-5, atol=1e-6)


def test_time_tensors_are_ts_dtype_and_reused():
    """The drift gets 0-d tensors of ts's dtype (not y0's); a step's end time is the same tensor
    as the next step's start (torchnde's time cache), and changing it in place does not leak."""
    seen = []

    class Rec:
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            seen.append(t)
            return -y

        def g(self, t, y):
            return 0.1 * torch.ones_like(y)

    y0 = torch.ones(2, 2)
    ts.sdeint(Rec(), y0, torch.tensor([0.0, 0.5], dtype=F64), method="heun", dt=0.25)
    assert all(t.dtype == F64 and t.dim() == 0 for t in seen)
    assert seen[2] is seen[3]  # heun: f(t1) of step 1 is f(t0) of step 2
    seen[-1].add_(100.0)  # modified by user code: not handed out again
    seen.clear()
    ts.sdeint(Rec(), y0, torch.tensor([0.0, 0.5], dtype=F64), method="heun", dt=0.25)
    assert float(seen[-1]) == 0.5


def test_f_and_g_and_logqp_evaluate_g_once_per_point():
    """An SDE with only f_and_g is called once per evaluation point (not once for f and once for g),
    and logqp evaluates g once per point (its drift and the diffusion share it), as torchsde does;
    the values are those of the SDE with f and g."""
    calls = {"fg": 0, "g": 0}
    base = SDE("diagonal", "ito")

    class FG(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f_and_g(self, t, y):
            calls["fg"] += 1
            return base.f(t, y), base.g(t, y)

    class Counted(SDE):
        def g(self, t, y):
            calls["g"] += 1
            return super().g(t, y)

    y0 = torch.full((B, D), 0.7, dtype=F64)
    tt = torch.tensor([0.0, 1.0], dtype=F64)
    ours = ts.sdeint(FG(), y0, tt, bm=bm_for("diagonal", levy="none"), method="euler", dt=0.125)
    ref = ts.sdeint(base, y0, tt, bm=bm_for("diagonal", levy="none"), method="euler", dt=0.125)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # the shape checks, then one call per step (8 steps; the first step's output checks may add one)
    assert calls["fg"] <= 2 + 8 + 1
    ys, kl = ts.sdeint(Counted("diagonal", "ito"), y0, tt, method="euler", dt=0.125, logqp=True)
    assert calls["g"] <= 1 + 8 + 1 and torch.isfinite(kl).all()


def test_outputs_on_and_between_grid_times_match_torchsde():
    """Output times on the step grid are the nodes' values (only those nodes are saved), times
    between grid times torchsde's linear interpolation: both equal to torchsde on its own path."""
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.full((B, D), 0.7, dtype=F64)
    for tt in ([0.0, 0.25, 0.3, 1.0], [0.0, 0.5, 1.0], [0.0, 0.3, 0.6]):
        tt = torch.tensor(tt, dtype=F64)
        bms = [torchsde.BrownianInterval(0.0, 1.0, size=(B, D), dtype=F64, entropy=7) for _ in range(2)]
        ref = torchsde.sdeint(sde, y0, tt, bm=bms[0], method="heun", dt=0.125)
        ours = ts.sdeint(sde, y0, tt, bm=bms[1], method="heun", dt=0.125)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
