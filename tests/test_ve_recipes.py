"""NCSN from a recipe: `[diffusion] schedule = "ve"` trains on a variance-exploding ladder whose
sigma_max is, by default, the largest distance between two training examples (Song & Ermon
2020, technique 1), and the exported model folder keeps that exact ladder."""

from __future__ import annotations

import itertools

import pytest
import torch

from difflab.pipelines import Pipeline, read_manifest
from difflab.schedules import Schedule
from difflab.train import run
from difflab.train.config import Config
from difflab.train.tasks import DataInfo
from test_train_support import tiny_config


class Points:
    """A dataset of a few known vectors."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def test_largest_distance_is_the_largest_pairwise_l2_distance():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    brute = max(float((a - b).norm()) for a, b in itertools.combinations(x, 2))
    info = DataInfo.of(Points(x))
    assert info.largest_distance() == pytest.approx(brute, rel=1e-12)
    # only the first `limit` examples are looked at (a cap for large data sets)
    first = max(float((a - b).norm()) for a, b in itertools.combinations(x[:4], 2))
    assert info.largest_distance(limit=4) == pytest.approx(first, rel=1e-12)


def test_a_ve_recipe_takes_sigma_max_from_the_data_and_exports_its_ladder(tmp_path):
    from difflab.train.batches import build_dataset

    cfg = tiny_config(diffusion={"schedule": "ve", "T": 30, "sigma_min": 0.02}, train={"steps": 1},
                      sample={"sampler": "langevin", "steps": 5})  # fmt: skip
    folder = run(cfg, tmp_path / "ncsn") / "model"
    manifest = read_manifest(folder)
    data = build_dataset(dict(cfg.data))
    expected = DataInfo.of(data).largest_distance()
    assert manifest["schedule"]["kind"] == "ve" and manifest["schedule"]["sigma_max"] == pytest.approx(expected)
    schedule = Schedule.from_config(manifest["schedule"])
    torch.testing.assert_close(schedule.sigmas, Schedule.ve(0.02, expected, 30).sigmas, rtol=0, atol=0)
    assert float(schedule.sigmas[0]) == pytest.approx(0.02) and float(schedule.sigmas[-1]) == pytest.approx(expected)
    assert 5.0 < expected < 40.0  # 8x8 digits in [-1, 1]: a few units apart, less than the diameter 16
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    assert pipe.generate(2, seed=0, sampler="pc", steps=3).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "diffusion, message",
    [
        ({"schedule": "ve", "sigma_min": 0.0}, "sigma_min"),
        ({"schedule": "ve", "sigma_min": 1.0, "sigma_max": 0.5}, "sigma_max"),
        ({"schedule": "ve", "zero_terminal_snr": True}, "zero_terminal_snr"),
        ({"schedule": "ve", "ve_spacing": "linear"}, "ve_spacing"),
    ],
)
def test_bad_ve_settings_are_named(diffusion, message):
    raw = tiny_config().to_dict()
    raw["diffusion"].update(diffusion)
    with pytest.raises(ValueError, match=message):
        Config.from_dict(raw)
