"""Events: location, terminal and resetting events, per-sample semantics, gradients."""

import math

import pytest
import torch

import torchnde as tn
from torchnde import Event, ODETerm, PIDController, SaveAt, Tsit5, solve

F64 = torch.float64
G = 9.8
TIGHT = dict(controller=PIDController(rtol=1e-9, atol=1e-9))


def fall(t, y, args):
    """A ball under gravity args[0] (state: height, velocity; last dim)."""
    return torch.stack([y[..., 1], -args[0] * torch.ones_like(y[..., 1])], -1)


def height(t, y, args):
    return y[..., 0]


def bounce(t, y, args, which):
    return torch.stack([y[..., 0], -args[1] * y[..., 1]], -1)


def drop_time(h0, g=G):
    return math.sqrt(2 * h0 / g)


# ----------------------------------------------------------------------------------------------
# input checks


def test_event_arguments_are_checked():
    with pytest.raises(TypeError, match="callable"):
        Event(3.0)
    with pytest.raises(ValueError, match="direction"):
        Event(height, direction=2)
    with pytest.raises(ValueError, match="terminal=False"):
        Event(height, reset=bounce)
    with pytest.raises(ValueError, match="check_points"):
        Event(height, check_points=-1)
    with pytest.raises(ValueError, match="tol"):
        Event(height, tol=0.0)
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    with pytest.raises(TypeError, match="Event"):
        solve(ODETerm(fall), Tsit5(), 0.0, 3.0, y0, args=(G,), event=height, **TIGHT)
    with pytest.raises(ValueError, match="reset of"):
        solve(
            ODETerm(_ramp),
            Tsit5(),
            0.0,
            1.0,
            torch.zeros(2, dtype=F64),
            dt0=0.5,
            event=Event(lambda t, y, a: y[0] - 0.3, terminal=False, reset=lambda t, y, a, w: y[:1]),
        )
    with pytest.raises(ValueError, match="max_events"):
        solve(ODETerm(fall), Tsit5(), 0.0, 3.0, y0, args=(G,), event=Event(height), max_events=0, **TIGHT)
    with pytest.raises(ValueError, match="per_sample=True"):
        solve(
            ODETerm(fall),
            Tsit5(),
            0.0,
            3.0,
            torch.ones(3, 2, dtype=F64),
            args=(G,),
            event=Event(lambda t, y, a: y.sum()),
            per_sample=True,
            **TIGHT,
        )


# ----------------------------------------------------------------------------------------------
# closed forms


def test_drop_time_and_its_gradients():
    """h0 = 10, g = 9.8: impact at sqrt(2 h0 / g), dt/dg = -t/(2g), dt/dh0 = 1/(g t)."""
    g = torch.tensor(G, dtype=F64, requires_grad=True)
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    y0 = torch.stack([h0, torch.zeros((), dtype=F64)])
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 5.0, y0, args=(g,), event=Event(height, direction=-1), **TIGHT)
    t = drop_time(10.0)
    ev = sol.events
    assert ev.count == 1 and ev.terminated and sol.successful
    assert abs(float(ev.t[0].detach()) - t) < 1e-12 and abs(sol.t_final - t) < 1e-12
    assert abs(float(sol.ts[-1]) - t) < 1e-12 and abs(float(sol.ys[-1, 0].detach())) < 1e-10
    assert abs(float(ev.y_minus[0, 1]) + G * t) < 1e-9
    dg, dh = torch.autograd.grad(ev.t[0], (g, h0))
    assert abs(float(dg) + t / (2 * G)) < 1e-9
    assert abs(float(dh) - 1 / (G * t)) < 1e-9


def test_bounces_follow_the_geometric_series_and_their_gradient():
    """Restitution e: the k-th impact is at t1 (1 + 2 e + ... + 2 e^k) -> t1 (1+e)/(1-e)."""
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    ev = Event(height, direction=-1, terminal=False, reset=bounce)
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 12.0, y0, args=(G, e), event=ev, max_events=6, **TIGHT)
    t1 = drop_time(10.0)
    want = [t1 * (1 + 2 * sum(0.8**j for j in range(1, k + 1))) for k in range(6)]
    assert sol.events.count == 6 and sol.events.terminated  # the 6th event ended the solve
    assert torch.allclose(sol.events.t.detach(), torch.tensor(want, dtype=F64), atol=1e-10, rtol=0)
    assert want[-1] < t1 * 1.8 / 0.2  # below the Zeno time
    # d t_k / d e = 2 t1 sum_j j e^(j-1)
    k = 4
    (d,) = torch.autograd.grad(sol.events.t[k], e)
    assert abs(float(d) - 2 * t1 * sum(j * 0.8 ** (j - 1) for j in range(1, k + 1))) < 1e-8
    # velocities flip with the factor e at each impact
    vm, vp = sol.events.y_minus[:, 1].detach(), sol.events.y_plus[:, 1].detach()
    assert torch.allclose(vp[:-1], -0.8 * vm[:-1], rtol=1e-12)


def test_leaky_integrate_and_fire_period():
    """v' = (mu - v)/tau from 0, spike at theta and reset to 0: period tau ln(mu / (mu - theta))."""
    tau, theta = 0.5, 1.0
    mu = torch.tensor([1.5, 2.0, 3.0], dtype=F64)

    def lif(t, v, args):
        return (args - v) / tau

    ev = Event(
        lambda t, v, a: v[:, 0] - theta, direction=1, terminal=False, reset=lambda t, v, a, w: torch.zeros_like(v)
    )
    sol = solve(
        ODETerm(lif),
        Tsit5(),
        0.0,
        3.0,
        torch.zeros(3, 1, dtype=F64),
        args=mu[:, None],
        event=ev,
        per_sample=True,
        **TIGHT,
    )
    period = tau * torch.log(mu / (mu - theta))
    n = torch.floor(3.0 / period).long()
    assert torch.equal(sol.events.count, n)
    for i in range(3):
        got = sol.events.t[i, : n[i]]
        want = period[i] * torch.arange(1, int(n[i]) + 1, dtype=F64)
        assert torch.allclose(got, want, atol=1e-9, rtol=0)
    assert torch.isnan(sol.events.t[0, n[0] :]).all() and (sol.events.event[0, n[0] :] == -1).all()


# ----------------------------------------------------------------------------------------------
# location


def _ramp(t, y, args):
    return torch.ones_like(y)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_earliest_of_two_crossings_in_one_step_wins(order):
    levels = [0.3, 0.5]
    evs = [Event(lambda t, y, a, c=levels[i]: y[0] - c) for i in order]
    sol = solve(ODETerm(_ramp), Tsit5(), 0.0, 1.0, torch.zeros(1, dtype=F64), dt0=1.0, event=evs)
    assert sol.stats["num_steps"] == 1
    assert abs(float(sol.events.t[0]) - 0.3) < 1e-12
    assert int(sol.events.event[0]) == order.index(0)


def test_ties_are_reported():
    evs = [Event(lambda t, y, a: y[0] - 0.5), Event(lambda t, y, a: 2 * (y[0] - 0.5))]
    sol = solve(ODETerm(_ramp), Tsit5(), 0.0, 1.0, torch.zeros(1, dtype=F64), dt0=1.0, event=evs)
    assert sol.events.ties[0].tolist() == [True, True]
    assert int(sol.events.event[0]) == 0


def test_vector_condition_reports_its_component():
    cond = Event(lambda t, y, a: torch.stack([y[0] - 0.7, y[0] - 0.2, y[0] + 5]))
    sol = solve(ODETerm(_ramp), Tsit5(), 0.0, 1.0, torch.zeros(1, dtype=F64), dt0=0.5, event=cond)
    assert int(sol.events.component[0]) == 1 and abs(float(sol.events.t[0]) - 0.2) < 1e-12


def test_no_event_on_rejected_steps():
    """The first (rejected) step of y' = -50 y overshoots below zero; the solution never does."""
    seen = []

    def cond(t, y, args):
        seen.append(float(y[0]))
        return y[0] + 0.5

    sol = solve(
        ODETerm(lambda t, y, a: -50 * y),
        Tsit5(),
        0.0,
        1.0,
        torch.ones(1, dtype=F64),
        dt0=1.0,
        controller=PIDController(rtol=1e-6, atol=1e-6),
        event=Event(cond),
    )
    assert sol.stats["num_rejected"] > 0 and sol.successful
    assert sol.events.count == 0 and not sol.events.terminated
    assert min(seen) > -0.5  # (cond is only evaluated on accepted steps)


def test_double_crossing_inside_one_step_needs_check_points():
    """sin t crosses 0.9 up and back down inside one step of length 3."""
    term = ODETerm(lambda t, y, a: torch.cos(t).expand_as(y))
    y0 = torch.zeros(1, dtype=F64)
    cond = lambda t, y, a: y[0] - 0.9  # noqa: E731
    missed = solve(term, Tsit5(), 0.0, 3.0, y0, dt0=3.0, event=Event(cond))
    assert missed.events.count == 0
    found = solve(term, Tsit5(), 0.0, 3.0, y0, dt0=3.0, event=Event(cond, check_points=6))
    # (located on the dense output of one step of length 3: accurate to a few 1e-2)
    assert found.events.count == 1 and abs(float(found.events.t[0]) - math.asin(0.9)) < 5e-2


def test_boolean_condition_is_located_by_bisection():
    sol = solve(
        ODETerm(_ramp), Tsit5(), 0.0, 1.0, torch.zeros(1, dtype=F64), dt0=0.5, event=Event(lambda t, y, a: y[0] >= 0.4)
    )
    assert abs(float(sol.events.t[0]) - 0.4) < 1e-12


def test_backwards_in_time():
    y0 = torch.tensor([0.0, 0.0], dtype=F64)
    # backwards from t = 0 the ball was higher at earlier times: h(t) = -g t^2 / 2 ... reaches -5 at t = -sqrt(10/g)
    sol = solve(ODETerm(fall), Tsit5(), 0.0, -5.0, y0, args=(G,), event=Event(lambda t, y, a: y[0] + 5.0), **TIGHT)
    assert abs(float(sol.events.t[0]) + math.sqrt(10 / G)) < 1e-10 and sol.t_final < 0


def test_float32_event():
    y0 = torch.tensor([10.0, 0.0])
    sol = solve(
        ODETerm(fall), Tsit5(), 0.0, 5.0, y0, args=(G,), event=Event(height), controller=PIDController(1e-6, 1e-6)
    )
    assert sol.events.t.dtype == torch.float32 and abs(float(sol.events.t[0]) - drop_time(10.0)) < 1e-5


def test_saving_around_events():
    """ts after a terminal event are NaN; dense output and saved steps follow the resets."""
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t1 = drop_time(10.0)
    sol = solve(
        ODETerm(fall), Tsit5(), 0.0, 5.0, y0, args=(G,), event=Event(height), saveat=SaveAt(ts=[0.5, 1.0, 2.0]), **TIGHT
    )
    assert torch.isnan(sol.ys[2]).all() and abs(float(sol.ys[1, 0]) - (10 - G / 2)) < 1e-9
    ev = Event(height, direction=-1, terminal=False, reset=bounce)
    sol = solve(
        ODETerm(fall), Tsit5(), 0.0, 3.0, y0, args=(G, 0.5), event=ev, saveat=SaveAt(dense=True, steps=True), **TIGHT
    )
    s = 2.5  # after the first bounce: up from 0 with speed 0.5 g t1
    v = 0.5 * G * t1
    want = v * (s - t1) - G / 2 * (s - t1) ** 2
    assert abs(float(sol.evaluate(s)[0]) - want) < 1e-8
    assert abs(float(sol.evaluate(1.0)[0]) - (10 - G / 2)) < 1e-8
    assert (sol.ys[:, 0] > -1e-9).all()  # no saved step ends below ground


# ----------------------------------------------------------------------------------------------
# shared vs per-sample


def test_shared_mode_stops_at_the_first_element():
    y0 = torch.tensor([[10.0, 0.0], [5.0, 0.0]], dtype=F64)
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 5.0, y0, args=(G,), event=Event(height), **TIGHT)
    assert abs(sol.t_final - drop_time(5.0)) < 1e-10 and int(sol.events.component[0]) == 1


def test_per_sample_events_equal_solving_each_alone():
    h = torch.tensor([10.0, 5.0, 2.0, 7.5], dtype=F64)
    y0 = torch.stack([h, torch.zeros_like(h)], -1)
    ev = Event(height, direction=-1, terminal=False, reset=bounce)
    kw = dict(args=(G, 0.7), event=ev, max_events=3, **TIGHT)
    batch = solve(ODETerm(fall), Tsit5(), 0.0, 6.0, y0, per_sample=True, **kw)
    for i in range(4):
        alone = solve(ODETerm(fall), Tsit5(), 0.0, 6.0, y0[i : i + 1], per_sample=True, **kw)
        assert torch.allclose(batch.events.t[i], alone.events.t[0], atol=1e-12, rtol=0, equal_nan=True)
        assert torch.allclose(batch.ys[i], alone.ys[0], atol=1e-12, rtol=0)
        assert int(batch.events.count[i]) == int(alone.events.count[0])
        t1 = drop_time(float(h[i]))
        assert abs(float(batch.events.t[i, 0]) - t1) < 1e-10
    assert batch.events.terminated.all() and torch.allclose(batch.t_final, batch.events.t[:, 2].detach())


# ----------------------------------------------------------------------------------------------
# gradients against central finite differences (float64)


def _fd(fun, x, eps=1e-6):
    return (fun(x + eps) - fun(x - eps)) / (2 * eps)


@pytest.mark.parametrize("per_sample", [False, True])
def test_post_reset_state_gradient_matches_finite_differences(per_sample):
    y0 = torch.tensor([[10.0, 0.0], [6.0, 1.0]], dtype=F64)
    if not per_sample:
        y0 = y0[0]
    ev = Event(height, direction=-1, terminal=False, reset=bounce)

    def loss(e, g=G):
        sol = solve(ODETerm(fall), Tsit5(), 0.0, 5.0, y0, args=(g, e), event=ev, per_sample=per_sample, **TIGHT)
        return (sol.ys[..., -1, :] * torch.tensor([1.0, 0.3], dtype=F64)).sum() + sol.events.t.nan_to_num().sum()

    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(loss(e), e)
    with torch.no_grad():
        fd = _fd(loss, torch.tensor(0.8, dtype=F64))
    assert abs(float(d) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))
    g = torch.tensor(G, dtype=F64, requires_grad=True)
    (dg,) = torch.autograd.grad(loss(torch.tensor(0.8, dtype=F64), g), g)
    with torch.no_grad():
        fdg = _fd(lambda x: loss(torch.tensor(0.8, dtype=F64), x), torch.tensor(G, dtype=F64))
    assert abs(float(dg) - float(fdg)) < 1e-5 * max(1.0, abs(float(fdg)))


def test_gradient_of_a_threshold_in_the_condition():
    """LIF spike time w.r.t. the threshold: d/dtheta [tau ln(mu/(mu-theta))] = tau/(mu-theta)."""
    theta = torch.tensor(1.0, dtype=F64, requires_grad=True)
    mu, tau = 2.0, 0.5
    sol = solve(
        ODETerm(lambda t, v, a: (mu - v) / tau),
        Tsit5(),
        0.0,
        2.0,
        torch.zeros(1, dtype=F64),
        args=theta,
        event=Event(lambda t, v, a: v[0] - a),
        **TIGHT,
    )
    (d,) = torch.autograd.grad(sol.events.t[0], theta)
    assert abs(float(d) - tau / (mu - 1.0)) < 1e-7


def test_max_events_and_no_events_record():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 1.0, y0, args=(G,), event=Event(height), **TIGHT)
    assert sol.events.count == 0 and sol.events.t.shape == (0,) and sol.t_final == 1.0
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 1.0, y0, args=(G,), **TIGHT)
    assert sol.events is None


def test_events_of_a_cde():
    """A CDE driven by a linear path X(t) = 2t: y' = 2 -> crosses 1 at t = 0.5."""
    ts = torch.linspace(0, 1, 5, dtype=F64)
    X = tn.paths.LinearInterpolation(ts, torch.stack([ts, 2 * ts], -1))
    term = tn.ControlTerm(lambda t, y, a: torch.tensor([[0.0, 1.0]], dtype=F64), X)
    sol = solve(term, Tsit5(), 0.0, 1.0, torch.zeros(1, dtype=F64), dt0=0.1, event=Event(lambda t, y, a: y[0] - 1.0))
    assert abs(float(sol.events.t[0]) - 0.5) < 1e-10


def _clock_sde(w, seed=3, dtype=F64):
    """Exponential clock (Holberg & Salvi 2024): v is an OU process, Lambda' = exp(w v) integrates the
    intensity, and a neuron fires when Lambda crosses a threshold E ~ Exp(1) fixed per trial."""
    from torchnde.paths import VirtualBrownianTree

    B = 4
    gen = torch.Generator().manual_seed(seed)
    E = -torch.log(torch.rand(B, generator=gen, dtype=dtype))

    def drift(t, y, a):
        v = y[:, 0]
        return torch.stack([(1.0 - v) / 0.5, torch.exp(a * v)], -1)

    def diffusion(t, y, a):
        return torch.stack([0.5 * torch.ones_like(y[:, 0]), torch.zeros_like(y[:, 1])], -1)

    bm = VirtualBrownianTree(0.0, 4.0, (B, 2), seed=torch.arange(B) + seed, dtype=dtype)
    terms = tn.MultiTerm(ODETerm(drift), tn.ControlTerm(diffusion, bm, noise="diagonal"))
    ev = Event(lambda t, y, a: y[:, 1] - E, direction=1)
    y0 = torch.zeros(B, 2, dtype=dtype)
    return solve(terms, tn.Euler(), 0.0, 4.0, y0, dt0=0.01, args=w, event=ev, per_sample=True)


def test_exponential_clock_sde_pathwise_gradient():
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    sol = _clock_sde(w)
    assert sol.events.terminated.all()
    loss = sol.events.t[:, 0].sum()
    (d,) = torch.autograd.grad(loss, w)
    with torch.no_grad():
        fd = _fd(lambda x: _clock_sde(x).events.t[:, 0].sum(), torch.tensor(0.7, dtype=F64))
    assert float(d) < 0  # a higher intensity fires earlier
    assert abs(float(d) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_recorded_event_leaves_the_solution_and_its_gradient_unchanged():
    k = torch.tensor(0.9, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    osc = ODETerm(lambda t, y, a: torch.stack([y[1], -a * y[0]]))
    kw = dict(args=k, saveat=SaveAt(ts=[1.0, 2.5, 4.0]), **TIGHT)
    plain = solve(osc, Tsit5(), 0.0, 4.0, y0, **kw)
    rec = solve(osc, Tsit5(), 0.0, 4.0, y0, event=Event(lambda t, y, a: y[0], terminal=False), **kw)
    assert rec.events.count == 1 and not rec.events.terminated
    assert torch.allclose(rec.ys, plain.ys, atol=1e-8, rtol=0)
    (a,) = torch.autograd.grad(plain.ys.sum(), k)
    (b,) = torch.autograd.grad(rec.ys.sum(), k, retain_graph=True)
    assert abs(float(a) - float(b)) < 1e-6
    # the zero crossings of cos(sqrt(k) t) and their gradient d/dk [pi / (2 sqrt k)] = -pi / (4 k^1.5)
    w = math.sqrt(0.9)
    assert abs(float(rec.events.t[0].detach()) - math.pi / (2 * w)) < 1e-8
    (d,) = torch.autograd.grad(rec.events.t[0], k)
    assert abs(float(d) + math.pi / (4 * 0.9**1.5)) < 1e-6


@pytest.mark.parametrize("direction", [-1, 0])
def test_start_on_the_surface_moving_away(direction):
    """A ball thrown up from the ground: no event at t = 0, the impact at 2 v / g."""
    y0 = torch.tensor([0.0, 5.0], dtype=F64)
    sol = solve(ODETerm(fall), Tsit5(), 0.0, 3.0, y0, args=(G,), event=Event(height, direction=direction), **TIGHT)
    assert sol.events.count == 1 and abs(float(sol.events.t[0].detach()) - 10 / G) < 1e-10


@pytest.mark.parametrize("adjoint", [tn.CheckpointAdjoint(), tn.BacksolveAdjoint(), tn.ReversibleAdjoint()], ids=repr)
def test_other_adjoints_by_segments_match_direct(adjoint):
    """Cut at the events, each piece under the adjoint: the same event times, states and gradients."""
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    ev = Event(height, direction=-1, terminal=False, reset=bounce)
    kw = dict(saveat=SaveAt(ts=[1.0, 2.0, 4.5, 5.8]), event=ev, max_events=3, **TIGHT)

    def run(adj):
        e = torch.tensor(0.8, dtype=F64, requires_grad=True)
        sol = solve(ODETerm(fall), Tsit5(), 0.0, 6.0, y0, args=(G, e), adjoint=adj, **kw)
        loss = sol.ys.nan_to_num().sum() + sol.events.t.sum()
        return sol, torch.autograd.grad(loss, e)[0]

    ref, d_ref = run(tn.DirectAdjoint())
    got, d_got = run(adjoint)
    assert got.events.count == 3 and got.events.terminated and torch.isnan(got.ys[3]).all()
    assert torch.allclose(got.events.t.detach(), ref.events.t.detach(), atol=1e-9, rtol=0)
    assert torch.allclose(got.ys, ref.ys, atol=1e-7, rtol=0, equal_nan=True)
    assert abs(float(d_got) - float(d_ref)) < 1e-5 * max(1.0, abs(float(d_ref)))


def test_condition_never_sees_finished_samples_as_nan():
    """Samples that are done take empty steps; an event in another sample must not hand NaN rows to
    the user's functions."""
    seen = []

    def cond(t, y, a):
        seen.append(bool(torch.isnan(y).any()))
        return y[:, 1] - torch.tensor([0.3, 0.25, 0.41], dtype=F64)

    term = ODETerm(lambda t, y, a: torch.stack([-y[:, 0], torch.ones_like(y[:, 0])], 1))
    ev = Event(cond, direction=1, terminal=False, reset=lambda t, y, a, w: y * torch.tensor([1.0, 0.0], dtype=F64))
    t1 = torch.tensor([1.0, 1.0, 0.5], dtype=F64)
    sol = solve(term, tn.Euler(), 0.0, t1, torch.zeros(3, 2, dtype=F64), dt0=0.07, event=ev, per_sample=True)
    assert not any(seen) and sol.events.count.tolist() == [3, 4, 1]


def test_fixed_steps_keep_their_grid_after_an_event():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    ev = Event(height, direction=-1, terminal=False, reset=bounce)
    sol = solve(ODETerm(fall), tn.RK4(), 0.0, 2.0, y0, args=(G, 0.5), dt0=0.25, event=ev, saveat=SaveAt(steps=True))
    t = sol.ts.tolist()
    assert abs(t[5] - drop_time(10.0)) < 1e-9  # the interrupted step ends at the event ...
    assert t[:5] == [0.25, 0.5, 0.75, 1.0, 1.25] and t[6:] == [1.5, 1.75, 2.0]  # ... the grid stays
