"""Behaviour of difflab.process that the mutation run (benchmarks/mutation.py) showed untested:
q_step's exact formula, the pass-through of var_frac and the exact error messages."""

import re

import pytest
import torch

from difflab.process import Prediction, check_data, model_log_variance, q_sample, q_step
from difflab.schedules import Schedule


@pytest.fixture
def sched():
    return Schedule.make("linear", T=200)


def test_q_step_is_sqrt_one_minus_beta_times_x_prev_plus_sqrt_beta_times_the_given_noise(sched):
    """The noise's sign matters for a given eps (a sampled chain cannot tell, eps being symmetric)."""
    g = torch.Generator().manual_seed(0)
    x_prev = torch.randn(4, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 7, 100, 199])
    beta = sched.betas[t].double().view(-1, 1)
    expected = (1 - beta).sqrt() * x_prev + beta.sqrt() * eps
    torch.testing.assert_close(q_step(sched, x_prev, t, eps), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_prediction_from_output_keeps_the_variance_fraction(sched, kind):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, dtype=torch.float64, generator=g), torch.randn(3, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([1, 50, 150])
    ab = sched.alpha_bar_at(t)
    x_t = q_sample(sched, x0, t, eps)
    var_frac = torch.rand(3, 2, dtype=torch.float64, generator=g)
    out = Prediction(x0=x0, eps=eps).target(kind, ab)
    pred = Prediction.from_output(kind, out, x_t, ab, var_frac=var_frac)
    assert pred.var_frac is var_frac
    assert Prediction.from_output(kind, out, x_t, ab).var_frac is None


def test_check_data_names_the_argument_and_the_wrong_type():
    with pytest.raises(ValueError, match=r"^x0 must be a torch\.Tensor, got list$"):
        check_data([0.0, 1.0])
    with pytest.raises(ValueError, match=r"^cond must be a torch\.Tensor, got int$"):
        check_data(3, name="cond")
    with pytest.raises(ValueError, match=r"^x0 must be a floating-point tensor"):
        check_data(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^x0 contains NaN or inf values; only finite values are allowed$"):
        check_data(torch.tensor([float("inf")]))


def test_learned_variance_without_var_frac_says_exactly_what_is_missing(sched):
    message = "variance type 'learned' needs the network's variance output (var_frac)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        model_log_variance(sched, torch.tensor([1]), "learned", torch.zeros(1))
