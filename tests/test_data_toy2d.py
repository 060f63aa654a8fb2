"""2-D toy sets: exact mixture parameters, sample statistics, curve geometry, the data set."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from difflab.data.toy2d import (
    KINDS,
    Toy2DDataset,
    grid_mixture_params,
    ring_mixture_params,
    sample_mixture,
    sample_moons,
    sample_swiss_roll,
    sample_toy2d,
)

N = 20_000


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ring_and_grid_parameters():
    ring = ring_mixture_params()
    assert ring["weights"].shape == (8,) and ring["means"].shape == (8, 2)
    assert ring["covs"].shape == (8, 2, 2)
    assert ring["weights"].sum().item() == pytest.approx(1.0)
    assert torch.allclose(ring["means"].norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(ring["means"][0], torch.tensor([2.0, 0.0]))
    assert torch.allclose(ring["means"][2], torch.tensor([0.0, 2.0]), atol=1e-6)
    assert torch.allclose(ring["covs"], 0.01 * torch.eye(2).expand(8, 2, 2))

    grid = grid_mixture_params()
    assert grid["means"].shape == (25, 2)
    ticks = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert torch.equal(grid["means"][:5, 0], ticks) and torch.equal(grid["means"][::5, 1], ticks)
    assert torch.allclose(grid["weights"], torch.full((25,), 0.04))

    custom = ring_mixture_params(num_components=3, radius=1.0, std=0.5, dtype=torch.float64)
    assert custom["means"].dtype == torch.float64 and custom["covs"][0, 0, 0] == 0.25


@pytest.mark.parametrize(
    ("params", "freq_tol", "mean_tol"),
    # tolerances are ~5 standard errors for n = 20,000: component frequency sd is
    # sqrt(p(1-p)/n) (0.0023 for K=8, 0.0014 for K=25); a component mean's sd is 0.1/sqrt(n/K)
    # (0.0020 for K=8, 0.0035 for K=25)
    [(ring_mixture_params(), 0.012, 0.01), (grid_mixture_params(), 0.007, 0.018)],
    ids=["ring", "grid"],
)
def test_mixture_samples_match_the_parameters(params, freq_tol, mean_tol):
    points, components = sample_mixture(params, N, generator(1), return_components=True)
    assert points.shape == (N, 2) and points.dtype == torch.float32
    k = len(params["weights"])
    freq = torch.bincount(components, minlength=k).double() / N
    assert (freq - params["weights"].double()).abs().max() < freq_tol
    for c in range(k):
        members = points[components == c].double()
        assert (members.mean(0) - params["means"][c]).abs().max() < mean_tol
        # the variance estimate's sd is 0.01 * sqrt(2 / (n/K)) <= 0.0005: 0.0025 is 5 sd
        assert (members.T.cov() - params["covs"][c]).abs().max() < 0.0025
    # components are well separated, so each point is nearest to its own component's mean
    nearest = torch.cdist(points, params["means"]).argmin(dim=1)
    assert (nearest == components).double().mean() > 0.999


def test_samplers_are_reproducible_from_the_generator():
    for kind in KINDS:
        a = sample_toy2d(kind, 100, generator(5))
        assert torch.equal(a, sample_toy2d(kind, 100, generator(5))), kind
        assert not torch.equal(a, sample_toy2d(kind, 100, generator(6))), kind


def test_swiss_roll_lies_on_its_spiral():
    points = sample_swiss_roll(2000, generator(), noise=0.0).double() * 7.0
    t = points.norm(dim=1)  # the radius of t (cos t, sin t) is t
    assert t.min() >= 1.5 * math.pi - 1e-4 and t.max() <= 4.5 * math.pi + 1e-4
    on_curve = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    assert torch.allclose(points, on_curve, atol=1e-4)
    # t is uniform on [1.5 pi, 4.5 pi]: mean 3 pi, sd sqrt(3) pi / 2 / sqrt(2000) ~ 0.06
    assert t.mean().item() == pytest.approx(3 * math.pi, abs=0.3)


def test_swiss_roll_noise_is_added_per_point():
    clean = sample_swiss_roll(N, generator(2), noise=0.0)
    noisy = sample_swiss_roll(N, generator(2), noise=0.05)
    # same draws of t, then independent N(0, 0.05^2) noise in each coordinate
    assert (noisy - clean).std().item() == pytest.approx(0.05, rel=0.03)


def test_moons_lie_on_two_half_circles():
    points = sample_moons(N, generator(3), noise=0.0).double()
    upper_centre, lower_centre = torch.tensor([-0.5, -0.25]), torch.tensor([0.5, 0.25])
    on_upper = ((points - upper_centre).norm(dim=1) - 1).abs() < 1e-5
    on_lower = ((points - lower_centre).norm(dim=1) - 1).abs() < 1e-5
    assert (on_upper | on_lower).all()
    assert (points[on_upper, 1] >= upper_centre[1] - 1e-6).all()  # upper half of its circle
    assert (points[on_lower, 1] <= lower_centre[1] + 1e-6).all()  # lower half of its circle
    # each moon is picked with probability 1/2 (sd 0.0035 at n = 20,000)
    assert on_upper.double().mean().item() == pytest.approx(0.5, abs=0.02)
    noisy = sample_moons(N, generator(3))
    # centred: the mean is 0 (sd of the mean < 0.01 per coordinate)
    assert noisy.mean(0).abs().max() < 0.03


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_follows_the_contract(kind):
    data = Toy2DDataset(kind, n=500, seed=4)
    assert len(data) == 500 and data.image_shape == (2,) and data.num_classes is None
    item = data[10]
    assert set(item) == {"x"} and item["x"].shape == (2,) and item["x"].dtype == torch.float32
    assert torch.equal(item["x"], data.points[10])
    assert torch.equal(data.points, Toy2DDataset(kind, n=500, seed=4).points)
    assert not torch.equal(data.points, Toy2DDataset(kind, n=500, seed=4, split="test").points)
    assert (data.mixture_params is not None) == (kind in ("ring", "grid"))
    batch = next(iter(DataLoader(data, batch_size=32)))
    assert set(batch) == {"x"} and batch["x"].shape == (32, 2)


def test_dataset_options_reach_the_sampler_and_the_parameters():
    data = Toy2DDataset("ring", n=N, std=0.3, radius=1.0)
    assert torch.allclose(data.mixture_params["covs"][0], 0.09 * torch.eye(2))
    radius = data.points.norm(dim=1)
    assert radius.mean().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Toy2DDataset("spiral"), "kind must be one of"),
        (lambda: Toy2DDataset("moons", std=0.1), r"unknown option\(s\) \['std'\]"),
        (lambda: Toy2DDataset("ring", split="val"), "split must be one of"),
        (lambda: sample_moons(0), "n must be a positive int"),
        (lambda: sample_moons(10, noise=-1.0), "noise must be"),
        (lambda: ring_mixture_params(std=0.0), "std must be"),
        (lambda: grid_mixture_params(side=0), "side must be"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
