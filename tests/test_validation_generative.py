"""Input validation of torchnde.generative (issue 16): what a new user passes by mistake gets a
clear error naming what was received and what was expected, or the right answer; never a raw
broadcast error from deep inside, never a silently wrong number."""

import pytest
import torch

import torchnde as tn
from torchnde.generative import CNF, VP, GaussianData, GaussianMixtureData, ModelShapeError, log_prob, sample
from torchnde.generative.flow_matching import MLP, sample_ode

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

GAUSS = GaussianData([0.5, -0.5], [[1.0, 0.3], [0.3, 0.5]])
MIX = GaussianMixtureData([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[0.5, 0.3], [0.4, 0.6]])
VP_ = VP()
TOL = dict(controller=tn.PIDController(rtol=1e-7, atol=1e-7))


def _exact_log_prob(oracle, x):
    """log p_{t0}(x) through the probability-flow ODE of the exact score, with the exact marginal
    at t1 as the prior: the only error left is the solver's."""
    flow = VP_.probability_flow(oracle.score_fn(VP_))
    prior = lambda z: oracle.log_prob(VP_, VP_.t1, z)  # noqa: E731
    return log_prob(flow, x, VP_.t0, VP_.t1, prior, **TOL)


# ------------------------------------------------------------------------ log_prob of one point
@pytest.mark.parametrize("oracle", [GAUSS, MIX], ids=["gaussian", "mixture"])
def test_log_prob_of_one_unbatched_point_is_its_log_density(oracle):
    # was: a (2,) point read as a batch of two scalars, giving two numbers that are not its density
    x = torch.tensor([0.3, -0.2], dtype=F64)
    one = _exact_log_prob(oracle, x)
    batched = _exact_log_prob(oracle, x[None])
    assert one.shape == () and batched.shape == (1,)
    torch.testing.assert_close(one, batched[0], rtol=0, atol=1e-12)
    exact = oracle.log_prob(VP_, VP_.t0, x[None])[0]
    torch.testing.assert_close(one.detach(), exact, rtol=0, atol=1e-5)


def test_log_prob_of_a_1d_x_without_a_known_event_shape_is_refused():
    f = lambda t, x: -x  # noqa: E731  (declares no event shape)
    x = torch.tensor([0.3, -0.2], dtype=F64)
    with pytest.raises(ValueError, match=r"x has shape \(2,\).*x\[None\].*event_shape=\(\)"):
        log_prob(f, x, 0.0, 1.0)
    # saying what one example is settles it: one 2-D point, or a batch of two scalars
    one = log_prob(f, x, 0.0, 1.0, event_shape=(2,), **TOL)
    scalars = log_prob(f, x, 0.0, 1.0, event_shape=(), **TOL)
    assert one.shape == () and scalars.shape == (2,)
    torch.testing.assert_close(one, log_prob(f, x[None], 0.0, 1.0, **TOL)[0])
    torch.testing.assert_close(scalars, log_prob(f, x[:, None], 0.0, 1.0, **TOL))
    with pytest.raises(ValueError, match="event_shape must be a tuple"):
        log_prob(f, x, 0.0, 1.0, event_shape=2)


def test_log_prob_of_data_of_the_wrong_dimension():
    x = torch.randn(4, 3, dtype=F64)
    # a model that declares its event shape: checked before any solve
    flow = VP_.probability_flow(GAUSS.score_fn(VP_))
    with pytest.raises(ValueError, match=r"x of shape \(4, 3\) does not fit the model.*\(2,\).*data dimension 2"):
        log_prob(flow, x, VP_.t0, VP_.t1)
    # one that does not: its own error, named with the shape it was given
    net = torch.nn.Linear(2, 2).double()
    with pytest.raises(ModelShapeError, match=r"vector field failed on a batch of shape \(4, 3\)") as info:
        log_prob(lambda t, y: net(y), x, 0.0, 1.0)
    assert isinstance(info.value, RuntimeError) and "mat1 and mat2" in str(info.value)


def test_cnf_log_prob_of_one_unbatched_point():
    field = MLP(2, hidden=8, depth=1).double()
    cnf = CNF(field, event_shape=(2,), trace="exact")
    x = torch.tensor([0.3, -0.2], dtype=F64)
    with torch.no_grad():
        one, batched = cnf.log_prob(x), cnf.log_prob(x[None])
    assert one.shape == () and batched.shape == (1,)
    torch.testing.assert_close(one, batched[0])
    with pytest.raises(ValueError, match=r"x has shape \(3, 3\).*example shape \(2,\).*\(batch, 2\)"):
        cnf.log_prob(torch.randn(3, 3, dtype=F64))


# --------------------------------------------------------------------------------------- sample
def test_sample_with_a_shape_that_does_not_fit_the_model():
    model = GAUSS.model(VP_, "eps")  # declares event_shape (2,)
    with pytest.raises(ValueError, match=r"shape=\(5, 3\) does not fit the model.*\(2,\).*shape=\(batch, 2\)"):
        sample(model, VP_, (5, 3), nfe=4, parameterisation="eps")
    with pytest.raises(ValueError, match=r"shape=\(2,\) does not fit"):  # one example's shape, no batch
        sample(model, VP_, (2,), nfe=4, parameterisation="eps")
    net = MLP(2, hidden=8, depth=1)  # torchnde's MLP declares its dimension too
    with pytest.raises(ValueError, match=r"shape=\(5, 3\) does not fit the model"):
        sample(net, VP_, (5, 3), nfe=4, parameterisation="eps")
    # a model that declares nothing: its first call fails, and the error names the shape
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ModelShapeError, match=r"model failed on a batch of shape \(5, 3\).*data dimension 3"):
        sample(lambda t, x: plain(x), VP_, (5, 3), nfe=4, parameterisation="eps")


@pytest.mark.parametrize("shape", [1000, (5, 0), (5, -2), (), (5, 2.0), "5,2"])
def test_sample_shape_must_be_a_tuple_of_positive_ints(shape):
    with pytest.raises(ValueError, match="shape must be"):
        sample(GAUSS.model(VP_, "eps"), VP_, shape, nfe=4, parameterisation="eps")


def test_a_model_returning_the_wrong_shape_is_named_at_its_first_call():
    calls = []

    def model(t, x):
        calls.append(1)
        return x.sum(-1, keepdim=True)  # (B, 1): would broadcast silently against (B, 2)

    with pytest.raises(ModelShapeError, match=r"shaped like its input x \(5, 2\).*got \(5, 1\)"):
        sample(model, VP_, (5, 2), nfe=4, parameterisation="eps")
    assert len(calls) == 1


def test_other_model_errors_pass_through_unchanged():
    def model(t, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$") as info:
        sample(model, VP_, (5, 2), nfe=4, parameterisation="eps")
    assert not isinstance(info.value, ModelShapeError)


def test_sample_ode_with_x0_of_the_wrong_dimension():
    with pytest.raises(ValueError, match=r"x0 of shape \(4, 3\) does not fit the model.*\(batch, 2\)"):
        sample_ode(MLP(2, hidden=8, depth=1), torch.randn(4, 3), nfe=2)
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ModelShapeError, match=r"model failed on a batch of shape \(4, 3\)"):
        sample_ode(lambda t, x: plain(x), torch.randn(4, 3), nfe=2)


def test_log_prob_of_an_empty_batch_is_empty():
    # was: "cannot reshape tensor of 0 elements into shape [0, -1]" from inside the trace
    flow = VP_.probability_flow(GAUSS.score_fn(VP_))
    x = torch.zeros(0, 2, dtype=F64)
    for trace in ("exact", "hutchinson-rademacher"):
        lp = log_prob(flow, x, VP_.t0, VP_.t1, VP_.prior_log_prob, trace=trace, seed=0)
        assert lp.shape == (0,) and lp.dtype == F64
    assert VP_.prior_log_prob(x).shape == (0,)
