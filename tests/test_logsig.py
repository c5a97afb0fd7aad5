"""Signatures and log-signatures (torchnde.paths._logsig) and torchcde's logsig_windows."""

import math

import pytest
import torch

import torchnde.compat.torchcde as tcde
from torchnde.paths._logsig import logsignature, logsignature_channels, lyndon_words, signature

F64 = torch.float64

try:  # an independent implementation, used when it is installed (not a dependency)
    import iisignature
except ImportError:
    iisignature = None


def _mul(a, b):
    """The product of two truncated signatures (levels 1..N, each ``(..., C, ..., C)``) in the
    tensor algebra: level k is a_k + b_k + sum_j a_j ⊗ b_(k-j)."""
    out = []
    for k in range(1, len(a) + 1):
        level = a[k - 1] + b[k - 1]
        for j in range(1, k):
            x, y = a[j - 1], b[k - j - 1]
            level = level + x.reshape(*x.shape[: x.dim() - j], -1, 1).mul(
                y.reshape(*y.shape[: y.dim() - (k - j)], 1, -1)
            ).reshape(level.shape)
        out.append(level)
    return out


@pytest.mark.parametrize("depth", [3, 4])
def test_chen_identity(depth):
    x = torch.randn(4, 9, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    whole, first, second = signature(x, depth), signature(x[:, :5], depth), signature(x[:, 4:], depth)
    for a, b in zip(whole, _mul(first, second)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_depth2_closed_form():
    """Depth 2: the increments and the Lévy areas 1/2 sum_k (X_k - X_0)^i dX_k^j - (i <-> j)."""
    x = torch.randn(2, 7, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    d = x[:, 1:] - x[:, :-1]
    rel = x[:, :-1] - x[:, :1]
    area = 0.5 * (rel.unsqueeze(-1) * d.unsqueeze(-2) - d.unsqueeze(-1) * rel.unsqueeze(-2)).sum(1)
    got = logsignature(x, 2)
    assert got.shape == (2, 3 + 3)
    torch.testing.assert_close(got[:, :3], x[:, -1] - x[:, 0])
    torch.testing.assert_close(got[:, 3:], torch.stack([area[:, 0, 1], area[:, 0, 2], area[:, 1, 2]], -1))


def test_straight_line_and_lyndon_layout():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 6.0]], dtype=F64)  # a straight line: no area
    torch.testing.assert_close(logsignature(x, 3), torch.tensor([3.0, 6.0, 0.0, 0.0, 0.0], dtype=F64))
    line = logsignature(x, 5)  # at any depth only the increment remains
    torch.testing.assert_close(line[2:], torch.zeros(len(line) - 2, dtype=F64), rtol=0, atol=1e-12)
    assert lyndon_words(2, 3) == ((0,), (1,), (0, 1), (0, 0, 1), (0, 1, 1))
    # Witt's formula: sum_{k <= N} (1/k) sum_{d | k} mu(d) C^(k/d)
    assert [logsignature_channels(c, 3) for c in (1, 2, 3, 4)] == [1, 5, 14, 30]
    assert [logsignature_channels(2, n) for n in (4, 5)] == [8, 14]
    assert logsignature_channels(3, 2) == 6
    # a unit square's corner (right, then up): log(e^a e^b) = a + b + [a, b]/2 + ([a, [a, b]] +
    # [b, [b, a]])/12 (Baker-Campbell-Hausdorff), whose words aab and abb have coefficient 1/12
    corner = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(logsignature(corner, 3), torch.tensor([1.0, 1.0, 0.5, 1 / 12, 1 / 12], dtype=F64))


@pytest.mark.skipif(iisignature is None, reason="iisignature is not installed")
@pytest.mark.parametrize("channels, depth", [(2, 2), (3, 3), (4, 3), (2, 5), (3, 4)])
def test_matches_iisignature(channels, depth):  # pragma: no cover - optional
    x = torch.randn(5, 8, channels, dtype=F64, generator=torch.Generator().manual_seed(2))
    sig = torch.cat([s.flatten(1) for s in signature(x, depth)], -1)
    torch.testing.assert_close(sig, torch.as_tensor(iisignature.sig(x.numpy(), depth)))
    expanded = torch.as_tensor(iisignature.logsig(x.numpy(), iisignature.prepare(channels, depth, "x"), "x"))
    offsets = [sum(channels**j for j in range(1, k)) for k in range(1, depth + 1)]
    idx = [
        offsets[len(w) - 1] + sum(i * channels ** (len(w) - 1 - p) for p, i in enumerate(w))
        for w in lyndon_words(channels, depth)
    ]
    torch.testing.assert_close(logsignature(x, depth), expanded[:, idx])


def test_errors():
    with pytest.raises(ValueError, match="depth"):
        logsignature(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="shape"):
        logsignature(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="window_length"):
        tcde.logsig_windows(torch.zeros(5, 2), 2, 0)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_logsig_windows_as_torchcde_tests_it(depth):
    """torchcde's own check: the derivative of the linear interpolation of the output on each
    window is that window's log-signature (windows of 4 steps, index time)."""
    g = torch.Generator().manual_seed(3)
    window, pieces, C = 4, 3, 2
    x = torch.randn(1 + window * pieces, C, dtype=F64, generator=g)
    out = tcde.logsig_windows(x, depth, window)
    assert out.shape == (pieces + 1, logsignature_channels(C, depth))
    torch.testing.assert_close(out[0, :C], x[0])
    X = tcde.LinearInterpolation(tcde.linear_interpolation_coeffs(out))
    for i in range(pieces):
        want = logsignature(x[i * window : (i + 1) * window + 1], depth)
        torch.testing.assert_close(X.derivative(i + 0.5), want)
    # the deprecated form scales by the window length and returns the window ends
    scaled, ends = tcde.logsignature_windows(x, depth, window)
    torch.testing.assert_close(ends, torch.tensor([0.0, 4.0, 8.0, 12.0], dtype=F64))
    torch.testing.assert_close(scaled[1] - scaled[0], window * (out[1] - out[0]))


def test_logsig_windows_uneven_times_missing_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0.0, 0.7, 1.1, 2.6, 3.0, 4.2], dtype=F64)
    x = torch.randn(2, 6, 3, dtype=F64, generator=g, requires_grad=True)
    out = tcde.logsig_windows(x, 2, 1.5, t)  # windows end at 1.5, 3.0 (a knot) and 4.2 (clipped)
    assert out.shape == (2, 4, 6)
    # the first window is the path from t = 0 to 1.5, its value at 1.5 interpolated linearly
    x15 = x[:, 2] + (1.5 - 1.1) / (2.6 - 1.1) * (x[:, 3] - x[:, 2])
    first = logsignature(torch.cat([x[:, :3], x15.unsqueeze(1)], 1), 2)
    torch.testing.assert_close(out[:, 1] - out[:, 0], first)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    xm = x.detach().clone()
    xm[0, 1, 0] = math.nan  # missing: filled linearly, as torchcde
    filled = tcde.linear_interpolation_coeffs(xm, t)
    torch.testing.assert_close(tcde.logsig_windows(xm, 2, 1.5, t), tcde.logsig_windows(filled, 2, 1.5, t))


def test_log_ode_method_runs_a_cde():
    """The log-ODE method end to end: windows -> linear interpolation -> cdeint."""
    x = torch.randn(4, 41, 2, generator=torch.Generator().manual_seed(5))
    ls = tcde.logsig_windows(x, 2, 8)
    X = tcde.LinearInterpolation(tcde.linear_interpolation_coeffs(ls))
    func = torch.nn.Sequential(
        torch.nn.Linear(3, 3 * ls.shape[-1]), torch.nn.Tanh(), torch.nn.Unflatten(-1, (3, ls.shape[-1]))
    )
    z = tcde.cdeint(
        X, lambda t, z: func(z), torch.zeros(4, 3), X.interval, adjoint=False, method="rk4", options=dict(step_size=1.0)
    )
    assert z.shape == (4, 2, 3) and torch.isfinite(z).all()
