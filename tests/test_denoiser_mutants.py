"""Behaviour of difflab.denoiser that the mutation run (benchmarks/mutation.py) showed untested:
NetworkDenoiser's reading of a network's output (eps / x0 / v, learned variance, dtypes), the
factory, device lookup, timestep broadcasting, shape checks, thresholding defaults and messages."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from difflab.denoiser import (
    DENOISER_FACTORIES,
    FACTORY_MODULES,
    ClipDenoiser,
    Denoiser,
    DenoiserWrapper,
    DynamicThresholdDenoiser,
    MixtureDenoiser,
    NetworkDenoiser,
    as_timesteps,
    build_denoiser,
    device_of,
    network_dtype,
    parameterizations,
    thresholded,
)
from difflab.mixture import GaussianMixture
from difflab.schedules import Schedule
from test_messages_support import exact

S = Schedule.make("linear", T=100)


class Probe(nn.Module):
    """Returns a fixed output (in its input's dtype) and records what it was called with."""

    def __init__(self, out: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.out, self.seen = out, []

    def forward(self, x, t, cond=None):
        self.seen.append((x, t, cond))
        return self.out.to(x.dtype) * self.scale.to(x.dtype)


def alpha_bar(t):
    return torch.cumprod(1 - S.betas.double(), 0)[t].view(-1, 1, 1)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_network_output_is_read_in_its_parameterisation(kind):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 2, 4, dtype=torch.float64, generator=g)
    out = torch.randn(3, 2, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 40, 99])
    net, cond = Probe(out, dtype=torch.float64), {"y": torch.arange(3)}
    pred = NetworkDenoiser(net, S, prediction=kind)(x_t, t, cond)
    a = alpha_bar(t)
    x0, eps = {
        "eps": ((x_t - (1 - a).sqrt() * out) / a.sqrt(), out),
        "x0": (out, (x_t - a.sqrt() * out) / (1 - a).sqrt()),
        "v": (a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out),
    }[kind]
    torch.testing.assert_close(pred.x0, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-10, atol=1e-10)
    assert pred.var_frac is None
    ((x_seen, t_seen, cond_seen),) = net.seen
    assert torch.equal(x_seen, x_t) and cond_seen is cond
    assert t_seen.dtype == torch.float32 and t_seen.tolist() == [0.0, 40.0, 99.0]


def test_network_denoiser_defaults_to_eps_fixed_small_and_no_shape():
    den = NetworkDenoiser(Probe(torch.zeros(1)), S)
    assert (den.prediction, den.variance, den.sample_shape) == ("eps", "fixed_small", None)
    assert NetworkDenoiser(Probe(torch.zeros(1)), S, sample_shape=[3, 8]).sample_shape == (3, 8)


def test_learned_variance_takes_the_second_half_of_the_channels_as_v_in_minus_one_one():
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    mean_part = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    v = torch.rand(2, 3, 5, dtype=torch.float64, generator=g) * 2 - 1
    net = Probe(torch.cat([mean_part, v], 1), dtype=torch.float64)
    t = torch.tensor([10, 70])
    pred = NetworkDenoiser(net, S, prediction="x0", variance="learned")(x_t, t)
    torch.testing.assert_close(pred.x0, mean_part, rtol=0, atol=0)
    torch.testing.assert_close(pred.var_frac, (v + 1) / 2, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=exact("learned variance needs a network with 2x3 output channels, got 3")):
        NetworkDenoiser(Probe(mean_part, dtype=torch.float64), S, variance="learned")(x_t, t)


def test_a_half_precision_network_runs_in_its_dtype_and_the_prediction_comes_back_in_x_ts():
    x_t = torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 1, 4)
    net = Probe(torch.full((2, 1, 4), 0.5), dtype=torch.float16)
    pred = NetworkDenoiser(net, S, prediction="x0")(x_t, 5)
    assert net.seen[0][0].dtype == torch.float16
    assert pred.x0.dtype == pred.eps.dtype == torch.float64 and pred.x0.eq(0.5).all()


def test_network_dtype_is_the_first_floating_parameters_or_float32():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.step = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
            self.w = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
            self.u = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    assert network_dtype(Mixed()) == torch.bfloat16
    assert network_dtype(nn.Identity()) == torch.float32


def test_build_denoiser_picks_the_factory_and_forwards_everything():
    net = Probe(torch.zeros(1))
    for kind in ("eps", "x0", "v"):
        den = build_denoiser(net, S, kind, "learned", [2, 2])
        assert type(den) is NetworkDenoiser and den.net is net and den.schedule is S
        assert (den.prediction, den.variance, den.sample_shape) == (kind, "learned", (2, 2))
    plain = build_denoiser(net, S)
    assert (plain.prediction, plain.variance, plain.sample_shape) == ("eps", "fixed_small", None)
    cm = build_denoiser(net, S, "consistency", sigma_data=0.7)  # imports its module on first use
    assert type(cm).__name__ == "ConsistencyDenoiser" and cm.sigma_data == 0.7
    names = parameterizations()
    assert names[:4] == ("eps", "x0", "v", "consistency") and len(set(names)) == len(names)
    with pytest.raises(ValueError, match=exact(f"unknown parameterisation 'score'; allowed: {', '.join(names)}")):
        build_denoiser(net, S, "score")


def test_device_of_finds_the_network_through_wrappers():
    net = nn.Linear(2, 2, device="meta")  # a device other than the CPU, without a GPU
    den = ClipDenoiser(DenoiserWrapper(NetworkDenoiser(net, S)))
    assert device_of(den) == torch.device("meta")
    assert device_of(NetworkDenoiser(nn.Identity(), S)) == torch.device("cpu")  # no parameters
    mixture = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), 1.0)
    assert device_of(DenoiserWrapper(MixtureDenoiser(mixture, S))) == torch.device("cpu")


def test_as_timesteps_broadcasts_scalars_and_checks_the_shape():
    assert as_timesteps(7, 3).tolist() == [7, 7, 7]
    assert as_timesteps(torch.tensor(2.5), 2).tolist() == [2.5, 2.5]
    assert as_timesteps(torch.tensor([1, 2, 3]), 3).tolist() == [1, 2, 3]
    assert as_timesteps(4, 2, device="meta").device == torch.device("meta")
    with pytest.raises(ValueError, match=exact("t must be a scalar or have shape (3,), got (2,)")):
        as_timesteps(torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match=exact("t must be a scalar or have shape (2,), got (2, 1)")):
        as_timesteps(torch.zeros(2, 1), 2)


def test_check_shape_messages_name_the_shape_and_the_expectation():
    mixture = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), 1.0)
    den = MixtureDenoiser(mixture, S, sample_shape=(2, 3))
    den.check_shape([4, 2, 3])  # any sequence, batch >= 1
    den.check_shape((1, 2, 3))
    for bad in ((0, 2, 3), (5,)):
        with pytest.raises(ValueError, match=exact(f"shape must be (batch, ...) with batch >= 1, got {bad}")):
            den.check_shape(bad)
    with pytest.raises(ValueError, match=exact("shape (4, 3, 2) does not match the denoiser: expected (batch, 2, 3)")):
        den.check_shape((4, 3, 2))
    NetworkDenoiser(Probe(torch.zeros(1)), S).check_shape((2, 7, 7))  # no sample_shape: anything goes


def test_thresholding_defaults_and_exact_messages():
    mixture = GaussianMixture.isotropic(torch.ones(1), torch.zeros(1, 2), 1.0)
    base = MixtureDenoiser(mixture, S)
    assert ClipDenoiser(base).limit == 1.0 and DynamicThresholdDenoiser(base).percentile == 0.995
    static, dynamic = thresholded(base, "static"), thresholded(base, "dynamic")
    assert static.inner is base and static.limit == 1.0
    assert dynamic.inner is base and dynamic.percentile == 0.995
    assert thresholded(base, "static", limit=3).limit == 3.0 and thresholded(base, "static", limit=3).inner is base
    assert thresholded(base, "dynamic", percentile=0.9).percentile == 0.9
    assert ClipDenoiser(base, limit=2).limit == 2.0 and DynamicThresholdDenoiser(base, percentile=1).percentile == 1.0
    for bad in (True, "1", 0, float("nan")):
        with pytest.raises(ValueError, match=exact(f"limit must be a finite number > 0, got {bad!r}")):
            ClipDenoiser(base, limit=bad)
    for bad in (True, "0.5", 0):
        with pytest.raises(ValueError, match=exact(f"percentile must lie in (0, 1], got {bad!r}")):
            DynamicThresholdDenoiser(base, percentile=bad)
    with pytest.raises(ValueError, match=exact("unknown thresholding 'clip'; allowed: none, static, dynamic")):
        thresholded(base, "clip")
    with pytest.raises(ValueError, match=exact("a wrapper needs a Denoiser to wrap, got function")):
        DenoiserWrapper(lambda x, t: x)


def test_a_factory_module_is_imported_on_first_use_and_gets_every_argument(tmp_path, monkeypatch):
    (tmp_path / "difflab_test_fake_factory.py").write_text(
        "from difflab.denoiser import DENOISER_FACTORIES\n"
        "class Fake:\n"
        "    def __init__(self, *args, **options):\n"
        "        self.args, self.options = args, options\n"
        "DENOISER_FACTORIES['fake'] = Fake\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(FACTORY_MODULES, "fake", "difflab_test_fake_factory")
    try:
        assert "fake" not in DENOISER_FACTORIES and parameterizations()[-1] == "fake"  # listed before import
        net = Probe(torch.zeros(1))
        den = build_denoiser(net, S, "fake", "learned", (3,), scale=2)
        assert den.args == (net, S, "fake", "learned", (3,)) and den.options == {"scale": 2}
        assert parameterizations().count("fake") == 1
    finally:
        DENOISER_FACTORIES.pop("fake", None)
        sys.modules.pop("difflab_test_fake_factory", None)


class Recording(Denoiser):
    schedule = S

    def __init__(self):
        self.seen = []

    def predict(self, x_t, t, cond):
        self.seen.append((t, cond))
        return "prediction"


def test_calling_a_denoiser_puts_t_on_x_ts_device_and_wrappers_pass_cond_on():
    den = Recording()
    den(torch.empty(2, 3, device="meta"), 5)
    assert den.seen[0][0].device == torch.device("meta") and den.seen[0][0].shape == (2,)
    cond = {"y": torch.arange(2)}
    assert DenoiserWrapper(den)(torch.zeros(2, 3), torch.tensor([1, 2]), cond) == "prediction"
    assert den.seen[1][1] is cond and den.seen[1][0].tolist() == [1, 2]
